import numpy as np
import pandas as pd

from freeshap_dq.evaluation.report import curve_styles, save_plots


def test_every_detection_curve_has_its_own_colour_and_line_style():
    """matplotlib's default cycle gives the 11th curve the 1st one's colour: FreeShap and a baseline looked alike."""
    styles = curve_styles(12)
    assert len(set(styles)) == 12
    assert styles[0] != styles[10] and styles[0][0] == styles[10][0]


def test_the_detection_plot_draws_twelve_curves(tmp_path):
    x = np.linspace(0, 1, 11)
    curves = {f"detector_{i}": (x, x ** (1 + i / 10)) for i in range(12)}
    written = save_plots(pd.DataFrame({"experiment": []}), {"detection": ("symmetric", 0, curves)}, tmp_path)
    assert written == ["detection.png"] and (tmp_path / "detection.png").stat().st_size > 10_000
