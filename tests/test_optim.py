"""AdamW, clipping and the learning-rate schedule against hand-computed values."""
import math

import numpy as np

from npgpt.optim import AdamW, grad_norm, lr_at


def test_schedule_warmup_then_cosine_to_min():
    lr, mn, warm, decay = 1.0, 0.1, 10, 110
    assert lr_at(0, lr, mn, warm, decay) == 0.1
    assert lr_at(9, lr, mn, warm, decay) == 1.0
    assert lr_at(10, lr, mn, warm, decay) == 1.0
    assert math.isclose(lr_at(60, lr, mn, warm, decay), mn + 0.5 * (lr - mn))
    assert lr_at(110, lr, mn, warm, decay) == mn and lr_at(500, lr, mn, warm, decay) == mn
    vals = [lr_at(s, lr, mn, warm, decay) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_adamw_two_steps_by_hand():
    p = np.array([1.0, -2.0, 0.5], np.float64)
    decay = np.array([1, 1, 0], np.uint8)
    opt = AdamW(p, decay, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    ref = p.copy()
    m = np.zeros(3)
    v = np.zeros(3)
    grads = [np.array([0.1, -0.2, 0.3]), np.array([-0.05, 0.4, 0.0])]
    for t, g in enumerate(grads, 1):
        opt.step(g, lr=0.01, clip=0.0)
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
        upd = (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.95 ** t)) + 1e-8)
        ref = ref - 0.01 * (upd + 0.1 * decay * ref)
    np.testing.assert_allclose(p, ref, rtol=1e-12)
    assert opt.t == 2


def test_clipping_scales_to_max_norm():
    g = np.array([3.0, 4.0])
    assert grad_norm(g) == 5.0
    p1, p2 = np.zeros(2), np.zeros(2)
    a = AdamW(p1, np.zeros(2, np.uint8), beta1=0.0, beta2=0.0, eps=0.0)
    a.step(g, lr=1.0, clip=1.0)
    # with beta1 = beta2 = 0 the update is g / |g| elementwise, whatever the scale: clipping must not change it
    np.testing.assert_allclose(p1, -np.sign(g))
    b = AdamW(p2, np.zeros(2, np.uint8))
    b.step(g, lr=1.0, clip=1.0)
    np.testing.assert_allclose(b.m, 0.1 * g / 5.0, rtol=1e-5)  # the moment saw the clipped gradient
