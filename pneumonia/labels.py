"""The two classes, in the order of the model's one sigmoid unit: label = index, 1 = PNEUMONIA."""

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
NORMAL, PNEUMONIA = CLASS_NAMES
