"""Each setting declared once: the config, the saved train_config.json and the checks agree."""

import pytest

from gpt2tf import settings
from gpt2tf.errors import FieldError
from gpt2tf.train.config import StepConfig, TrainConfig


def test_train_config_fields_are_the_declared_settings():
    names = [s.name for s in settings.TRAIN]
    assert list(TrainConfig().to_dict()) == names
    assert TrainConfig().learning_rate == 2e-5  # nshepperd's CLI default
    assert settings.GPT2_SIMPLE_DEFAULTS["learning_rate"] == 1e-4  # gpt-2-simple's, stated once
    assert set(StepConfig().__dataclass_fields__) <= set(names)


@pytest.mark.parametrize("field, value, problem", [
    ("batch_size", 0, "must be an integer >= 1, got 0"),
    ("learning_rate", 0, "must be > 0, got 0.0"),
    ("learning_rate", float("nan"), "must be a finite number"),
    ("optimizer", "adamw", "must be one of adam, sgd, adafactor"),
    ("memory_saving_gradients", "yes", "is a switch"),
    ("top_p", 2, "must be in [0, 1], got 2.0"),
    ("val_fraction", 1, "must be in [0, 1), got 1.0"),
])
def test_bad_values_name_their_field(field, value, problem):
    with pytest.raises(FieldError) as e:
        TrainConfig(**{field: value})
    assert e.value.field == field and problem in e.value.problem
    assert e.value.phrased("--").startswith(f"--{field} ")


def test_cross_setting_check():
    with pytest.raises(FieldError, match="val_fraction cannot be given with --val_dataset"):
        TrainConfig(val_dataset="v.txt", val_fraction=0.1)


def test_resolve_prefers_given_then_stored_then_default():
    cfg = TrainConfig.resolve({"batch_size": 4, "top_k": None},
                              {"batch_size": 2, "top_k": 7, "unknown_old_field": 1})
    assert cfg.batch_size == 4 and cfg.top_k == 7 and cfg.seq_len == 0
