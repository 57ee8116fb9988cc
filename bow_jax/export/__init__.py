"""bow_jax.export: pure format conversions of a backbone's variables, one module per format,
files written atomically.

torchvision  our ResNet <-> torchvision state dicts and `.pth` files (also the official OBoW
             release layout); reads the official OBoW files (entire model, student / teacher)
detectron2   a torchvision state dict renamed to Detectron2's ResNet, as a `.pkl` for
             `DetectionCheckpointer`
"""
