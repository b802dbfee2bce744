"""Training: the step (step.py), the Run, its setup and the loop (loop.py), the stages (base.py,
finetune.py, rl.py) and their registry (stages.py), the time budget (budget.py), the memory model
(memory.py). No re-exports: import from the module that defines a name."""
