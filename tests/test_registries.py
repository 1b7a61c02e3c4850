"""The registries that the code dispatches on, held against the fixtures that verify them (optimum's
test_all_models_tested): a model type or method listed as supported without a parity fixture fails here."""

import re
from pathlib import Path

import builders
import test_encoders
import test_seq2seq

from spexport.converters import METHODS
from spexport.families import DECODER, ENCODER, FAMILIES, SEQ2SEQ, family_for

# model types with a tiny model that the family's parity tests build (their fixtures take FAMILIES' lists)
PARITY_MODELS = {DECODER.name: set(builders.FAMILIES), ENCODER.name: set(test_encoders.BASES),
                 SEQ2SEQ.name: set(test_seq2seq.MODELS)}
# PEFT methods the family's parity tests train and compare
PARITY_METHODS = {
    DECODER.name: {make(3).peft_type.value for make in {**builders.METHODS, **builders.MULTITASK}.values()},
    ENCODER.name: {make(test_encoders.SEQ, 3, {}).peft_type.value for make in test_encoders.METHODS.values()}
    | {"MULTITASK_PROMPT_TUNING"},  # test_encoders.test_multitask_prompt_tuning_gives_each_source_task_as_peft
    SEQ2SEQ.name: {make(3).peft_type.value for make, _ in test_seq2seq.METHODS.values()},
}


def test_all_models_tested():
    missing = sorted(t for f in FAMILIES for t in f.model_types - PARITY_MODELS[f.name])
    assert not missing, f"Missing models: {', '.join(missing)}"


def test_all_methods_tested():
    missing = sorted(f"{m.family.name}: {m.peft_type}" for m in METHODS
                     if m.peft_type not in PARITY_METHODS[m.family.name])
    assert not missing, f"Missing methods: {', '.join(missing)}"


def test_every_family_names_its_exporter_and_runtime_and_model_types_are_not_shared():
    from spexport.runtime.base import ServedArtifact

    assert len({f.name for f in FAMILIES}) == len({f.display_name for f in FAMILIES}) == len(FAMILIES)
    for family in FAMILIES:
        assert callable(family.exporter)
        assert issubclass(family.runtime, ServedArtifact) and family.runtime.family is family
        assert family.generates == ("generate" in family.runtime.VERBS)
        assert family.classifies == ("classify" in family.runtime.VERBS)
    for family in FAMILIES:
        for model_type in family.model_types:
            assert family_for(model_type) is family


def test_docs_list_the_registered_model_types():
    docs = Path(__file__).parents[1] / "docs"
    pages = "".join(page.read_text() for page in (docs / "models.md", docs / "families.md") if page.is_file())
    for family in FAMILIES:
        for model_type in family.model_types:
            assert re.search(rf"\b{re.escape(model_type)}\b", pages, re.IGNORECASE), \
                f"docs/models.md does not name {family.name} model type {model_type}"


def test_every_graph_pass_has_a_test_that_names_it():
    """A pass exported from spexport.export.passes is an onnx-ir pass with a test of its own on a tiny graph."""
    from onnx_ir.passes import PassBase

    from spexport.export import passes

    tests = "".join(path.read_text() for path in (Path(__file__).parent / "export" / "passes").glob("test_*.py"))
    for name in passes.__all__:
        assert issubclass(getattr(passes, name), PassBase), name
    untested = [name for name in passes.__all__ if not re.search(rf"\b{name}\b", tests)]
    assert not untested, f"passes with no test in tests/export/passes/: {untested}"
