"""Worked examples, each a model and its data, trained by ``+experiment=<name>``.

They are ordinary user code: xp names them only by ``_target_`` in ``conf/experiment/``,
exactly as it would name a class of your own package.

- :mod:`xp.examples.cnn`: a small CNN on the digits as 1x8x8 images (``digits_cnn``).
- :mod:`xp.examples.addition`: a tiny causal transformer that learns multi-digit
  addition from generated sequences (``addition_transformer``).
- :mod:`xp.examples.gan`: a GAN with two optimizers and its own ``train_step`` on a 2-D
  mixture of Gaussians (``gan_2d``).
"""
