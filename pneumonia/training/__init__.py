"""Training: the configuration, the data set, the architectures, augmentation, fitting, the operating
points, fitting the gate and the ONNX export. Needs the training install (requirements-train.txt)."""
