import numpy as np

from freeshap_dq import ValuationConfig
from freeshap_dq.data.synthetic import noisy_problem
from freeshap_dq.evaluation import experiments as ex
from freeshap_dq.valuation.run import compute_values
from freeshap_dq.valuation.stopping import MaxPermutations


def recording_learner(calls):
    def fit(subset):
        calls.append(np.asarray(subset))
        return float(len(subset))
    return fit


def test_removal_drops_the_right_examples():
    values = np.array([0.5, -0.2, 0.1, -0.9, 0.3, 0.0, 0.7, -0.1, 0.2, 0.4])
    calls = []
    table = ex.removal(values, {"count": recording_learner(calls)}, fractions=(0.0, 0.2))
    assert set(table["removed_from"]) == {"bottom", "top", "random"}
    by = {(r.removed_from, r.fraction_removed): calls[i] for i, r in enumerate(table.itertuples())}
    assert set(by[("bottom", 0.2)]) == set(range(10)) - {3, 1}  # the two lowest values go
    assert set(by[("top", 0.2)]) == set(range(10)) - {6, 0}  # the two highest go
    assert len(by[("random", 0.2)]) == 8 and len(by[("bottom", 0.0)]) == 10


def test_selection_keeps_the_best_and_every_class():
    worth = np.array([9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    calls = []
    table = ex.selection({"v": worth}, {"n": recording_learner(calls)}, y, fractions=(0.3,))
    chosen = calls[list(table["ranking"]).index("v")]
    assert sorted(chosen) == [0, 1, 8] and {"v", "random"} == set(table["ranking"])


def test_selection_of_a_fraction_smaller_than_the_classes_keeps_one_of_each():
    # 2 % of 100 is 2 picks, and there are 4 classes: each subset is the best of every class, 4 in all
    y = np.arange(100) % 4
    worth = -np.arange(100.0)
    calls = []
    table = ex.selection({"v": worth}, {"n": recording_learner(calls)}, y, fractions=(0.02,))
    chosen = calls[list(table["ranking"]).index("v")]
    assert sorted(chosen) == [0, 1, 2, 3]
    assert all(set(y[c]) == {0, 1, 2, 3} for c in calls)


def test_exact_fidelity_and_sign_robustness_run_and_agree():
    problem = noisy_problem(n_train=60, n_test=30, noise=0.1, seed=0).problem
    fidelity = ex.exact_fidelity(problem, ValuationConfig(permutations=3000), n=7)
    ce = fidelity.set_index("metric").loc["ce"]
    assert ce["pearson"] > 0.99 and ce["max_abs_error"] < 0.1 * ce["value_range"]
    robust = ex.sign_robustness(problem, ValuationConfig(permutations=20), sizes=(20, 40), resamples=3, targets=4,
                                se_share=0.25, max_permutations=400)
    assert set(robust["method"]) == {"freeshap", "freeshap_converged", "loo"}
    assert list(robust["size"].unique()) == [20, 40] and robust["pct_not_unanimous"].between(0, 100).all()
    by = robust.set_index(["size", "method"])
    for size in (20, 40):  # the converged run is what its name says: its errors are well below the values' spread
        converged = by.loc[(size, "freeshap_converged")]
        assert converged["permutations"] > 20
        assert converged["median_se_over_spread"] <= 0.25 or converged["permutations"] == 400
        assert by.loc[(size, "freeshap"), "median_se_over_spread"] > converged["median_se_over_spread"]


def test_targets_converged_stops_on_the_targets_errors_only():
    problem = noisy_problem(n_train=30, n_test=10, noise=0.1, seed=1).problem
    early = compute_values(problem, ValuationConfig(permutations=10), progress=False).stderr("ce")
    thresholds = early[:3] / 2  # about 4x the permutations for the three targets
    stop = ex.TargetsConverged(thresholds) | MaxPermutations(2000)
    result = compute_values(problem, ValuationConfig(permutations=2000), stopping=stop, progress=False)
    assert 10 < result.count < 2000 and np.all(result.stderr("ce")[:3] <= thresholds)
    assert np.any(result.stderr("ce")[3:] > thresholds.max())  # the others were not waited for
