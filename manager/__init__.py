"""The model manager's parts (model_manager.py holds the manager itself): backend loaders, memory
estimates, one chat model at a time, idle unloads, run-time tier changes and swaps that drain the old
model first."""
