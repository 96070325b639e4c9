"""The GRPO trainer's parts. The loop itself reads top to bottom in stages/train.py."""
