"""Positive control (issue 18): a grouping planted in a teacher is found by the best setting, not by the reference.

Teacher 64 -> 64, G = 8 unequal groups under hidden permutations, then train-mode BatchNorm; student
Flgc2d(G=8) + BatchNorm2d trained by SGD (flgc_lightning.assignments.planted). Fixed seeds, 2,000 steps each.
"""
from __future__ import annotations

import numpy as np

from flgc_lightning.assignments.planted import StudentConfig, make_teacher, train_student

TEACHER = make_teacher(64, 64, 8, seed=0)


def test_the_teacher_has_unequal_hidden_groups():
    for ids in (TEACHER.input_groups, TEACHER.filter_groups):
        sizes = np.bincount(ids, minlength=8)
        assert sizes.sum() == 64 and sizes.min() >= 2 and len(set(sizes.tolist())) >= 4
        assert not np.all(np.diff(ids) >= 0)  # permuted, not contiguous
    connected = TEACHER.filter_groups[:, None] == TEACHER.input_groups[None, :]
    assert (TEACHER.weight.numpy()[~connected] == 0).all()


def test_gumbel_with_dense_weight_gradients_and_regrouping_finds_the_planted_groups():
    best = train_student(TEACHER, 8, StudentConfig(assign_grad="gumbel", dense_weight_grad=True, tau_start=5.0,
                                                   tau_end=1.0, regroup_at=(0.2, 0.4, 0.6), freeze_at=0.6), seed=0)
    assert best.ari_inputs >= 0.9 and best.ari_filters >= 0.9, best
    reference = train_student(TEACHER, 8, StudentConfig(assign_grad="reference"), seed=0)
    assert reference.ari_inputs < 0.9 and reference.ari_filters < 0.9, reference
    frozen = train_student(TEACHER, 8, StudentConfig(frozen=True), seed=0)
    assert best.loss < 0.1 * frozen.loss  # and the found groups fit: 0.8649 frozen on average over 6 teachers
