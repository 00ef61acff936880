import pytest

from server.spec import PreprocessSpec, SpecError


def test_parameters_round_trip():
    spec = PreprocessSpec.cifar10()
    assert PreprocessSpec.from_parameters(spec.to_parameters()) == spec
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


def test_missing_keys_default_to_imagenet():
    assert PreprocessSpec.from_parameters({}) == PreprocessSpec.imagenet()


@pytest.mark.parametrize(
    "parameters",
    [
        {"preprocess.crop": "abc"},
        {"preprocess.mean": "1,2"},
        {"preprocess.crop": "300"},
        {"preprocess.layout": "CHW"},
    ],
)
def test_bad_values_are_refused(parameters):
    with pytest.raises(SpecError):
        PreprocessSpec.from_parameters(parameters)
