"""Training: the losses (declared in loss_weights.py, computed in losses.py), the loop, validation
and linear probes, recipes, CLIP initialisation."""
