"""Every implementation satisfies its declared contract (freeshap_dq.contracts)."""

from problems import random_problem

from freeshap_dq import ValuationConfig
from freeshap_dq.contracts import Engine, ModelAdapter, Utility, ValuationProblem
from freeshap_dq.kernels.landmarks import LandmarkKernel
from freeshap_dq.kernels.nystrom import nystrom_landmarks
from freeshap_dq.valuation.setup import make_engine, make_utility, plan


def test_problems_utilities_and_engines_meet_their_contracts():
    problem = random_problem()
    landmarks = LandmarkKernel.from_problem(problem, nystrom_landmarks(problem.n_train, 5, 0))
    for kernel in (problem, landmarks):
        assert isinstance(kernel, ValuationProblem)
        for config in (ValuationConfig(), ValuationConfig(low_rank=5)):
            config = plan(kernel, config)
            utility = make_utility(kernel, config)
            engine = make_engine(kernel, config, utility)
            assert isinstance(utility, Utility) and isinstance(engine, Engine)
            assert (utility.features is not None) == (kernel.landmark_rank is not None)
            assert ("low_rank" in engine.manifest_entries()) == bool(config.low_rank)


def test_adapters_meet_the_model_adapter_contract(tiny_bert_path):
    from freeshap_dq.ntk.builder import NTKConfig, build_adapter

    adapter, _ = build_adapter(NTKConfig(model=str(tiny_bert_path)), ("neg", "pos"))
    assert isinstance(adapter, ModelAdapter)
    assert adapter.word_table_name in dict(adapter.named_parameters()) and adapter.lora_rank == 0


def test_the_sequence_classifier_meets_the_model_adapter_contract(tmp_path):
    from tiny_models import tiny_classifier

    from freeshap_dq.ntk.builder import NTKConfig, build_adapter

    adapter, _ = build_adapter(NTKConfig(model=str(tiny_classifier(tmp_path / "gpt2", "gpt2"))), ("neg", "pos"),
                               log=lambda message: None)
    assert isinstance(adapter, ModelAdapter) and adapter.adapter_name == "sequence-classifier"
    assert adapter.word_table_name in dict(adapter.named_parameters()) and not adapter.vmap_compatible
    assert adapter.head.out_features == 2
