"""adm_lib.errors (foundation): the one error type, and its articles."""

from __future__ import annotations

import pytest

from adm_lib.errors import TrainError, with_article


@pytest.mark.parametrize(("noun", "expected"), [
    ("classifier", "a classifier"), ("upsampler", "an upsampler"),
    ("diffusion model", "a diffusion model"), ("image", "an image"),
])
def test_with_article(noun: str, expected: str) -> None:
    assert with_article(noun) == expected


def test_a_train_error_is_a_runtime_error_with_its_message() -> None:
    with pytest.raises(RuntimeError, match="^lr=0 must be > 0$"):
        raise TrainError("lr=0 must be > 0")
