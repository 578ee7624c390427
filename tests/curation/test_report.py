import re

import numpy as np
from problems import random_problem

from freeshap_dq import ValuationConfig, compute_values
from freeshap_dq.curation.report import html_report, summary_table


def test_html_report_honours_top_says_per_class_once_and_names_diagnostics_in_words(tmp_path):
    """--top below 20 was raised to 20, 'Per class' appeared twice, the diagnostics showed internal names."""
    p = random_problem(n=30, m=6, n_classes=2, train_ids=np.array([f"e{i}" for i in range(30)]))
    result = compute_values(p, ValuationConfig(permutations=5))
    df = summary_table(result, None)
    df["label"] = ["a", "b"] * 15
    html_report(result, df, tmp_path / "r.html", top=3)
    page = (tmp_path / "r.html").read_text()
    harmful = page.split("<h2>Most harmful</h2>", 1)[1].split("<h2>", 1)[0]
    assert len(re.findall(r"<tr>", harmful)) == 3  # the body rows: the top 3
    assert page.count("<h2>Per class</h2>") == 1 and page.count("Per class") == 1
    assert "median_stderr_over_spread" not in page and "Median standard error / spread" in page
