"""Training config loading: every mistake is one QuiverError naming the file and the dotted key at fault."""

import re
from pathlib import Path

import pytest
import yaml

from models.dssm import DSSMConfig
from models.errors import QuiverError
from training.config import Config, load_config, parse_config

BASE = """\
data:
  format: interactions
  path: data
  train: interactions.parquet
  items: items.parquet
features:
  user:
    - {name: user_id, kind: id, embedding_dim: 8}
  item:
    - {name: item_id, kind: id, embedding_dim: 8}
  hist:
    - {name: hist_item_id, kind: sequence, shared_with: item_id, embedding_dim: 8}
model:
  type: dssm
  output_dim: 8
train:
  epochs: 2
  lr: 0.01
output: {name: tiny}
"""


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _edited(**sections: object) -> dict:
    data = yaml.safe_load(BASE)
    for key, value in sections.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    return data


def _error(tmp_path: Path, data: object) -> str:
    path = _write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(QuiverError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_valid_config_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE))
    assert isinstance(cfg, Config) and isinstance(cfg.model, DSSMConfig)
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.01
    assert cfg.train.batch_size == 1024 and cfg.train.valid_metric == "Recall@20"  # defaults
    assert cfg.negatives.mode == "sampled" and cfg.negatives.alpha == 0.75
    assert cfg.output.root == "artifacts/models" and cfg.output.name == "tiny"
    assert [f.name for f in cfg.features.hist] == ["hist_item_id"]
    assert cfg.model.similarity == "cosine" and cfg.model.temperature == 1.0


def test_shipped_demo_config_is_valid() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "dssm_demo.yaml")
    assert cfg.output.name == "dssm_demo" and cfg.negatives.num == 512


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_is_valid(path: Path) -> None:
    """What `quiver-train fit` would refuse before training (the reranker's configs have their own schema)."""
    from training.config import read_yaml
    from training.tdm_config import is_tdm, parse_tdm_config

    data = read_yaml(path)
    cfg = parse_tdm_config(data, str(path)) if is_tdm(data) else load_config(path)
    assert cfg.output.name == path.stem


def test_ml1m_default_is_the_measured_full_softmax_with_l2() -> None:
    """configs/dssm_ml1m.yaml is what bench/README's ML-1M table measured as the default (0.7204 / 0.1657)."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "dssm_ml1m.yaml")
    assert cfg.negatives.mode == "full" and cfg.train.weight_decay == pytest.approx(1e-5) and cfg.train.epochs == 15
    assert cfg.train.lr == pytest.approx(0.005) and cfg.model.variational_dropout == ["user"]
    assert cfg.train.precision == "fp32"
    assert cfg.model.user_tower.hidden_units == [] and cfg.model.similarity == "inner_product"
    assert cfg.data.validation == "none" and cfg.data.query_seq_len == 2400  # the whole train file, whole histories


def test_unknown_key_names_the_dotted_path(tmp_path: Path) -> None:
    message = _error(tmp_path, _edited(train__lrr=0.1))
    assert "train.lrr" in message and "Extra inputs" in message
    message = _error(tmp_path, _edited(data__trian="x.parquet"))
    assert "data.trian" in message and "Extra inputs" in message
    message = _error(tmp_path, {**_edited(), "optimiser": {"lr": 1}})
    assert "optimiser" in message and "Extra inputs" in message


def test_train_precision_takes_fp32_or_bf16_and_names_the_key_otherwise(tmp_path: Path) -> None:
    assert parse_config(_edited(), "test").train.precision == "fp32"  # the default: no autocast
    assert parse_config(_edited(train__precision="bf16"), "test").train.precision == "bf16"
    message = _error(tmp_path, _edited(train__precision="fp16"))
    assert "train.precision" in message and "bf16" in message


def test_unknown_model_key_names_the_path_as_written_in_the_file(tmp_path: Path) -> None:
    # BUG: pydantic puts the discriminator tag in the error location, and format_validation_error keeps it, so the
    # message says `model.dssm.output_dimm` although the YAML has no `dssm` key (the key path is model.output_dimm).
    message = _error(tmp_path, _edited(model__output_dimm=8))
    assert "Extra inputs" in message
    assert "model.output_dimm" in message


def test_unknown_key_inside_a_feature_names_it(tmp_path: Path) -> None:
    data = _edited()
    data["features"]["item"][0]["embeding_dim"] = 4
    message = _error(tmp_path, data)
    assert "features.item.0.embeding_dim" in message and "Extra inputs" in message


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    message = _error(tmp_path, _edited(train__lr="fast"))
    assert "train.lr:" in message and "valid number" in message
    message = _error(tmp_path, _edited(train__epochs=0))
    assert "train.epochs:" in message
    message = _error(tmp_path, _edited(negatives={"mode": "random"}))
    assert "negatives.mode:" in message
    message = _error(tmp_path, _edited(model={"type": "dsm"}))
    assert "model" in message and "dsm" in message


def test_several_problems_in_one_line(tmp_path: Path) -> None:
    message = _error(tmp_path, _edited(train__lr="fast", train__epochs=-1))
    assert "train.lr:" in message and "train.epochs:" in message


def test_missing_required_section(tmp_path: Path) -> None:
    data = _edited()
    del data["output"]
    message = _error(tmp_path, data)
    assert "output: Field required" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QuiverError, match="config file not found") as err:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err.value)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "data:\n  format: interactions\n  path: [unclosed\ntrain: {epochs: 1}\n")
    with pytest.raises(QuiverError, match="not valid YAML") as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}:")
    line = int(message[len(str(path)) + 1 :].split(":")[0])
    assert line == 4  # the unclosed flow sequence opens on line 3; the parser stops at the ":" on line 4
    tabbed = _write(tmp_path, "data:\n\tformat: x\n", "tab.yaml")
    with pytest.raises(QuiverError, match=re.escape(f"{tabbed}:2: not valid YAML")):
        load_config(tabbed)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(QuiverError, match="expected a mapping of config sections"):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize("metric", ["Recall@0", "MAP@10", "Recall", "Recall@x", "NDCG@-1"])
def test_bad_valid_metric(tmp_path: Path, metric: str) -> None:
    message = _error(tmp_path, _edited(train__valid_metric=metric))
    assert "train.valid_metric" in message and metric in message


@pytest.mark.parametrize("metric", ["Recall@20", "HR@10", "NDCG@100"])
def test_good_valid_metric(metric: str) -> None:
    assert parse_config(_edited(train__valid_metric=metric), "x.yaml").train.valid_metric == metric


def test_eval_ks_must_be_positive(tmp_path: Path) -> None:
    message = _error(tmp_path, _edited(eval={"ks": [10, 0]}))
    assert "eval.ks" in message


def test_explicit_split_without_test_names_data_test(tmp_path: Path) -> None:
    message = _error(tmp_path, _edited(data__split="explicit"))
    assert "data.test" in message
    data = _edited(data__split="explicit", data__test="test.parquet")
    assert parse_config(data, "x.yaml").data.test == "test.parquet"
    message = _error(tmp_path, _edited(data__test="test.parquet"))  # a test file under leave_last_out
    assert "data.test" in message


def test_feature_group_errors_surface_through_the_config(tmp_path: Path) -> None:
    data = _edited()
    data["features"]["hist"][0]["shared_with"] = "missing_feature"
    message = _error(tmp_path, data)
    assert "hist_item_id" in message and "missing_feature" in message


def test_output_name_must_be_a_plain_folder_name(tmp_path: Path) -> None:
    message = _error(tmp_path, _edited(output={"name": "../escape"}))
    assert "output.name" in message
