import csv

import numpy as np
import pytest
from tokenizers import Tokenizer

from bertray.errors import TaskDataError
from bertray.tasks import swag
from bertray.tasks.registry import TASKS

HEADER = ["", "video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source",
          "ending0", "ending1", "ending2", "ending3", "label"]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))


def _write_csv(path, rows, header=HEADER):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)            # the official files are ordinary quoted CSV
        writer.writerow(header)
        writer.writerows(rows)
    return path


VAL_ROWS = [
    ["0", "lsmdc3001_21_JUMP_STREET-422", "16856", "Students lower their eyes nervously. She",
     "Students lower their eyes nervously.", "She", "gold",
     "pats her shoulder, then saunters toward someone.", "turns with two students.",
     "walks slowly towards someone.", "wheels around as her dog thunders out.", "2"],
    ["1", "anetv_jkn6uvmqwh4", "3", 'He rides the motorcycle down the hall and into the elevator. He',
     'He rides the motorcycle down the hall and into the elevator.', "He", "gen",
     "looks at a mirror in the mirror as he watches someone walk through a door.",
     'stops, listening to a cup of coffee with the seated woman, who\'s standing, "hello".',
     "exits the building and rides the motorcycle into a casino where he performs several tricks as people watch.",
     "pulls the bag out of his pocket and hands it to someone's grandma.", "2"],
]


def test_sample_json_lines(shared_data, tokenizer):
    examples, counts = swag.read_swag(shared_data / "swag-sample" / "sample.json")
    assert counts == {"rows": 10, "blank_lines": 0} and len(examples) == 10
    assert examples[0].label == 0 and examples[0].start == "A drum line" and examples[1].label == 3
    features = TASKS["swag"].featurize(examples, tokenizer)
    assert features["input_ids"].shape == (10, 4, 128) and features["input_ids"].dtype == np.int32
    assert features["attention_mask"].shape == (10, 4, 128) and features["token_type_ids"].shape == (10, 4, 128)
    assert features["labels"].tolist() == [e.label for e in examples]
    text = tokenizer.decode(features["input_ids"][0, 0].tolist())
    assert text == ("members of the procession walk down the street holding small horn brass instruments. "
                    "a drum line passes by walking down the street playing their instruments.")
    # segment B is "sent2 ending": type 1 from just after the first [SEP]
    sep = tokenizer.token_to_id("[SEP]")
    first_sep = int(np.flatnonzero(features["input_ids"][0, 0] == sep)[0])
    assert features["token_type_ids"][0, 0, first_sep + 1] == 1 and features["token_type_ids"][0, 0, first_sep] == 0


def test_official_csv_train_val_and_test(tmp_path, tokenizer):
    _write_csv(tmp_path / "swag" / "val.csv", VAL_ROWS)
    examples, counts = TASKS["swag"].read(tmp_path, "dev")
    assert counts["rows"] == 2 and [e.label for e in examples] == [2, 2]
    assert examples[1].endings[1].endswith('"hello".') and examples[0].guid == "0"
    _write_csv(tmp_path / "swag" / "test.csv", [r[:-1] for r in VAL_ROWS], header=HEADER[:-1])
    test, _ = TASKS["swag"].read(tmp_path, "test")
    assert all(e.label is None for e in test)
    features = TASKS["swag"].featurize(test, tokenizer, 32)
    assert features["input_ids"].shape == (2, 4, 32) and (features["labels"] == -1).all()


def test_evaluate_accuracy(shared_data):
    examples, _ = swag.read_swag(shared_data / "swag-sample" / "sample.json")
    gold = np.array([e.label for e in examples])
    logits = np.eye(4)[gold]
    assert TASKS["swag"].evaluate(examples, {}, {"logits": logits}) == {"accuracy": 100.0}
    logits[:3] = np.eye(4)[(gold[:3] + 1) % 4]
    assert TASKS["swag"].evaluate(examples, {}, {"logits": logits}) == {"accuracy": pytest.approx(70.0)}
    assert TASKS["swag"].decode(examples, {}, {"logits": np.eye(4)[gold]}) == gold.tolist()


def test_malformed_csv_and_json_raise_with_file_and_line(tmp_path):
    bad_label = [*VAL_ROWS[0][:-1], "4"]
    path = _write_csv(tmp_path / "bad.csv", [VAL_ROWS[1], bad_label])
    with pytest.raises(TaskDataError, match=f"{path}:3: label '4'"):
        swag.read_swag(path)
    path = _write_csv(tmp_path / "short.csv", [VAL_ROWS[0][:-2]])
    with pytest.raises(TaskDataError, match=f"{path}:2: expected 12 comma-separated fields, found 10"):
        swag.read_swag(path)
    path = _write_csv(tmp_path / "header.csv", [], header=["sent1", "sent2", "label"])
    with pytest.raises(TaskDataError, match="header lacks ending0"):
        swag.read_swag(path)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sent1": "a", "sent2": "b", "ending0": "c", "ending1": "d", "ending2": "e", "ending3": "f", '
                    '"label": 1}\n{"sent1": "a"}\n')
    with pytest.raises(TaskDataError, match=f"{path}:2: missing keys sent2"):
        swag.read_swag(path)
