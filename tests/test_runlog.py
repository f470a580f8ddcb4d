"""adm_lib.runlog (chapter 4): a run's metrics file, read back whole or
cut short, and its optional TensorBoard log."""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import replace

import pytest

from adm_lib import checkpoints as ck
from adm_lib import config as cf
from adm_lib import train as tr
from tests.helpers import config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_read_metrics_survives_a_cut_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kill's cut line is no news
        records = ck.read_metrics(tmp_path)
    assert records == [{"step": 1, "loss": 0.5}]


# Lines a run never writes: no step, not an object, a step not an integer,
# not JSON, empty.
NOT_RECORDS = ["{}", '{"loss": 0.5}', "[1, 2]", "3", '"step"', "null",
               '{"step": "2"}', '{"step": 1.5}', '{"step": true}',
               '{"step": null}', "not json", '{"step": 2', ""]


@pytest.mark.parametrize("line", NOT_RECORDS)
def test_a_metrics_line_that_is_not_a_record_is_named_and_kept(tmp_path,
                                                               line):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": step, "loss": 1 / step} for step in (1, 2, 3)]
    lines = [json.dumps(r) for r in records]
    path.write_text("\n".join([lines[0], line, *lines[1:]])
                    + '\n{"step": 4, "lo')  # and a kill's cut line
    named = (f"{path} line 2 is not a metrics record (a JSON object with "
             "an integer step): skipped")
    with pytest.warns(UserWarning) as caught:
        assert ck.read_metrics(tmp_path) == records
    assert [str(w.message) for w in caught] == [named]
    # A resume from step 2 drops the records after it, and keeps the line.
    with pytest.warns(UserWarning) as caught:
        ck.truncate_metrics(path, 2)
    assert [str(w.message) for w in caught] == [named]
    assert path.read_text() == "\n".join([lines[0], line, lines[1]]) + "\n"


def test_tensorboard_is_optional_and_named_when_missing(data, tmp_path):
    settings = replace(config(data), tensorboard=True)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(cf.TrainError, match="pip install tensorboard"):
            cf.validate(settings)
        assert not (tmp_path / "run").exists()
        return
    tr.train(settings, tmp_path / "run", progress=False)
    assert any((tmp_path / "run" / "tensorboard").iterdir())
