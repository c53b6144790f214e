"""What ``findlady watermark embed --help`` shows of the bundled examples, without torch.

``findlady_examples.models`` and ``train`` import torch (and more); the CLI's parser needs only
these names and defaults. A test checks that ``models.MODELS`` lists exactly ``MODEL_NAMES``.
"""

MODEL_NAMES = ("mlp", "vgg", "resnet", "mnist_cnn")
WATERMARK_STRENGTH = 1.0  # 0.1 left 3-4 of 64 bits wrong on the MNIST CNN; 1.0 gives 0, same accuracy
