import os

import pytest
import torch

# Two cores here: one intra-op thread keeps runs reproducible and avoids oversubscription when
# tests and background jobs share the machine.
torch.set_num_threads(int(os.environ.get("SQ_TEST_THREADS", "1")))


def tiny_ctc_config(cls_name: str, *, stable: bool):
    from transformers import HubertConfig, Wav2Vec2Config

    cls = {"wav2vec2": Wav2Vec2Config, "hubert": HubertConfig}[cls_name]
    return cls(
        vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer" if stable else "group", do_stable_layer_norm=stable,
    )


@pytest.fixture
def tiny_wav2vec2():
    """Base-style (group norm, post-LN) random Wav2Vec2ForCTC: the wav2vec2-base-960h architecture, tiny."""
    from transformers import Wav2Vec2ForCTC

    torch.manual_seed(0)
    return Wav2Vec2ForCTC(tiny_ctc_config("wav2vec2", stable=False)).eval()


@pytest.fixture
def tiny_hubert():
    """Large-style (layer norm, pre-LN) random HubertForCTC: the hubert-large-ls960-ft architecture, tiny."""
    from transformers import HubertForCTC

    torch.manual_seed(0)
    return HubertForCTC(tiny_ctc_config("hubert", stable=True)).eval()


@pytest.fixture
def conv1d_counts():
    """`expected_conv1d_counts`, as a fixture (tests import nothing from conftest)."""
    return expected_conv1d_counts


def expected_conv1d_counts(n_conv1d: int = 8, n_grouped: int = 1, *, also_float: int = 0,
                           groups: int = 4, channels_per_group: int = 16) -> dict[str, int]:
    """The conv1d entries of `count_quantized_ops` for a CTC model under StableQuantX86Quantizer: the
    grouped positional conv (default: the tiny test models' 4 groups of 16) computes in float (its
    weight stays INT8) where this CPU's policy says so (AMX: wrong; no VNNI: groups that are not
    multiples of 4 channels run oneDNN's slow reference kernel); `also_float` more are kept float."""
    from sq_plugin.backends.x86_isa import x86_policy

    problem = x86_policy().grouped_conv_problem(groups, channels_per_group, channels_per_group)
    weight_only = 0 if problem is None else n_grouped
    counts = {"conv1d": n_conv1d - also_float - weight_only}
    if weight_only:
        counts["conv1d_weight_only"] = weight_only
    if also_float:
        counts["conv1d_float"] = also_float
    return counts
