"""The model manager's parts (model_manager.py holds the manager itself): backend loaders, memory
estimates, one chat model at a time, swaps that drain the old model first."""
