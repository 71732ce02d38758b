"""What each trial's MLflow run carries, drawn without a server (the runs themselves: test_sweep_local, test_service)."""
import numpy as np

from sweeps.tracking import _histogram_canvas, log_alpha_histogram, log_alpha_histogram_png


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_each_trials_histogram_is_drawn_alone_on_the_reused_figure():
    """The figure is kept between trials; nothing of one trial's histogram (bars, legend, colours, y range) may
    show in the next: a trial's image must equal the one a fresh figure draws."""
    rng = np.random.default_rng(0)
    first = log_alpha_histogram({f"{i}.l0_gate": rng.normal(i, 2.0, 400).tolist() for i in range(5)})
    second = log_alpha_histogram({"fc.l0_gate": rng.normal(-3.0, 1.0, 30).tolist()})
    _histogram_canvas.cache_clear()
    alone = _pixels(log_alpha_histogram_png(second))
    _histogram_canvas.cache_clear()
    log_alpha_histogram_png(first)
    after_another = _pixels(log_alpha_histogram_png(second))
    assert alone.shape == after_another.shape == (280, 480, 3)
    assert np.array_equal(alone, after_another)
    assert not np.array_equal(alone, _pixels(log_alpha_histogram_png(first)))
    assert log_alpha_histogram_png(log_alpha_histogram({})) is None
