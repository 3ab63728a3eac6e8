"""N-rank data parallel equals one process with the same global batch; ranks agree bitwise."""

import pytest

from hpcdl import checkpoint
from hpcdl.config import ModelConfig

from conftest import hpcdl_train, read_summary
from reference import assert_close_states, reference_train

MODELS = {
    "mlp": ("synthetic", ModelConfig(name="mlp", hidden=[16, 8])),
    "cnn": ("images", ModelConfig(name="cnn", channels=[4, 6], fc=8)),
    "rnn": ("sequences", ModelConfig(name="rnn", cell="lstm", rnn_hidden=8)),
}
STEPS, BATCH, LR = 12, 48, 0.05


@pytest.mark.parametrize(("family", "ranks"), [("cnn", 2), ("mlp", 3), ("rnn", 4)])
def test_data_parallel_matches_single_process(datasets, tmp_path, family, ranks):
    data, model_cfg = MODELS[family]
    sizes = {  # each family's own keys: another family's would be refused (nothing reads them)
        "mlp": [f"model.hidden={model_cfg.hidden}"],
        "cnn": [f"model.channels={model_cfg.channels}", f"model.fc={model_cfg.fc}"],
        "rnn": [f"model.rnn_hidden={model_cfg.rnn_hidden}"],
    }[family]
    result = hpcdl_train(
        ranks,
        "digits-mlp",
        f"data.path='{datasets[data]}'",
        f"run.dir='{tmp_path}'",
        f"model.name='{family}'",
        *sizes,
        f"train.batch_size={BATCH}",
        f"train.max_steps={STEPS}",
        "train.optimizer='sgd'",
        f"train.lr={LR}",
        "train.epochs=100",
        "data.prefetch=1",
    )
    assert result.returncode == 0, result.stderr
    state = checkpoint.load(checkpoint.resolve("latest", tmp_path))
    assert state["global_step"] == STEPS
    expected = reference_train(datasets[data], model_cfg, seed=0, batch=BATCH, steps=STEPS, lr=LR)
    assert_close_states(state["model"], expected)
    digests = read_summary(tmp_path)["param_digests"]
    assert len(digests) == ranks and len(set(digests)) == 1, "ranks' parameters differ"
