"""Pure tensor maths of the method, no I/O: the local metrics, the mirror update of the saliency, masks
and their budgets, the OBS reconstruction of one matrix. docs/method.md states what each computes."""
