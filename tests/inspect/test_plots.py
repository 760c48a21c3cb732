"""The figures: each built from data, with its values where they belong (checked on the artists)."""

import numpy as np
import pytest

from slimtune.inspect import plots
from slimtune.inspect.adapter import ModuleStats


def stats(name, norm, s=(1.0, 0.5, 0.1)):
    return ModuleStats(name, (8, 8), len(s), norm, 1.0, 1.0, {"90%": 2, "95%": 2, "99%": 3}, list(s))


MODULES = [stats("model.layers.0.self_attn.q_proj", 1.0), stats("model.layers.0.mlp.down_proj", 2.0),
           stats("model.layers.1.self_attn.q_proj", 3.0), stats("model.layers.10.mlp.down_proj", 4.0),
           stats("lm_head", 9.0)]


def test_layer_and_kind_are_read_from_module_names():
    assert plots.layer_and_kind("model.layers.12.self_attn.v_proj") == (12, "v_proj")
    assert plots.layer_and_kind("transformer.h.3.attn.c_attn") == (3, "c_attn")
    assert plots.layer_and_kind("lm_head") == (None, "lm_head")


def test_norm_grid_places_each_norm_in_its_block_and_column():
    layers, kinds, grid = plots.norm_grid(MODULES)
    assert layers == [0, 1, 10] and kinds == ["q_proj", "down_proj"]  # forward order, lm_head left out
    expected = np.array([[1.0, 2.0], [3.0, np.nan], [np.nan, 4.0]])
    np.testing.assert_array_equal(grid, expected)


def test_heatmap_shows_the_grid_and_labels_it():
    fig = plots.norm_heatmap(MODULES)
    ax = fig.axes[0]
    np.testing.assert_array_equal(np.ma.filled(ax.images[0].get_array(), np.nan), plots.norm_grid(MODULES)[2])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q_proj", "down_proj"]
    assert sorted(t.get_text() for t in ax.texts) == ["1", "2", "3", "4"]
    assert plots.png_bytes(fig).startswith(b"\x89PNG")


def test_histogram_counts_every_nonzero_weight_and_names_the_zeros():
    a = np.array([0.1, -0.2, 0.3, 1e-3])
    b = np.array([0.0, 0.0, 0.5])
    fig = plots.weight_histogram({"A": a, "B": b})
    ax = fig.axes[0]
    filled = [p for p in ax.patches if p.get_fill()]
    assert [int(p.get_data().values.sum()) for p in filled] == [4, 1]  # every nonzero |w| in some bin
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["lora_A (4 values)", "lora_B (3 values, 2 exactly 0)"]


def test_spectra_are_normalised_and_mark_the_median_energy_ranks():
    fig = plots.spectra_figure(MODULES[:4])
    q = next(ax for ax in fig.axes if ax.get_title().startswith("q_proj"))
    assert q.get_title() == "q_proj: 90/95/99% at rank 2/2/3"
    curves = [line for line in q.get_lines() if len(line.get_xdata()) == 3]
    np.testing.assert_allclose(curves[0].get_ydata(), [1.0, 0.5, 0.1])
    vlines = sorted(line.get_xdata()[0] for line in q.get_lines() if len(line.get_xdata()) == 2)
    assert vlines == [2, 2, 3] and q.get_yscale() == "log"


def test_loss_curves_plot_train_and_eval_records():
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5},
               {"step": 4, "loss": 1.0}, {"step": 4, "eval_loss": 1.5}]
    ax = plots.loss_curves(records).axes[0]
    train, evals = ax.get_lines()
    assert list(train.get_xdata()) == [1, 2, 4] and list(train.get_ydata()) == [3.0, 2.0, 1.0]
    assert list(evals.get_xdata()) == [2, 4] and list(evals.get_ydata()) == [2.5, 1.5]


@pytest.mark.parametrize("make", [lambda: plots.norm_heatmap([]), lambda: plots.weight_histogram({"A": np.zeros(3)}),
                                  lambda: plots.loss_curves([])])
def test_empty_data_gives_a_figure_that_says_so(make):
    fig = make()
    assert any(t.get_text() for ax in fig.axes for t in ax.texts)
    assert plots.png_bytes(fig).startswith(b"\x89PNG")
