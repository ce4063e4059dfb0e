"""The commands that act on a record (`fine_tune/ft.py`, `ft_poison.py`, `qra.py`): their shared
driver (`driver`) and purification command (`finetune`)."""
