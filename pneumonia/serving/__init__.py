"""Serving: the model card, the model runtime (ONNX Runtime, or Keras as a fallback), the preprocessing
every path shares, the out-of-distribution gate, Grad-CAM and the one screening pipeline. Needs the slim
install only (requirements.txt); imports nothing of training, evaluation or the studies."""
