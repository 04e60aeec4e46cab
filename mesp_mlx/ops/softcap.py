"""Softcap (Gemma 2 attention and final logits): forward, hand backward, reference.

  forward   y = c · tanh(s / c)
  backward  ds = dy ⊙ (1 − (y / c)²)        read from the output y: nothing else stored
"""

import mlx.core as mx


def softcap(s, c):
    return mx.tanh(s / c) * c


def softcap_backward(dy, y, c):
    r = y / c
    return dy * (1 - r * r)


def softcap_ref(s, c):
    return c * mx.tanh(s / c)
