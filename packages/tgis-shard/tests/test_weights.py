"""The sharded safetensors loader: every rank's slices put back together give the stored tensor,
for one file, an indexed set of files and an unindexed set, on 1, 2 and 4 ranks."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tgis_shard import weights as weights_module
from tgis_shard.layers.distributed import TensorParallel
from tgis_shard.weights import Weights, WeightsError

HEAD_DIM = 4
NUM_HEADS = 4
NUM_KV_HEADS = 2
VOCAB = 10


def _tensors() -> dict[str, torch.Tensor]:
    q_rows, kv_rows = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    return {
        "layer.weight": torch.arange(8 * 12, dtype=torch.float32).reshape(8, 12),
        "layer.bias": torch.arange(8, dtype=torch.float32),
        "positions": torch.arange(4, dtype=torch.int64),
        "attn.q.weight": torch.arange(q_rows * 3, dtype=torch.float32).reshape(q_rows, 3),
        "attn.k.weight": torch.arange(kv_rows * 3, dtype=torch.float32).reshape(kv_rows, 3),
        "attn.qkv.weight": torch.arange((q_rows + 2 * kv_rows) * 2, dtype=torch.float32).reshape(-1, 2),
        "model.embed_tokens.weight": torch.arange(VOCAB * 3, dtype=torch.float32).reshape(VOCAB, 3),
    }


TENSORS = _tensors()
QKV_BLOCKS = [NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM]


def _write_split(folder: Path, index: bool) -> None:
    names = sorted(TENSORS)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, file_names in halves.items():
        save_file({name: TENSORS[name] for name in file_names}, folder / file)
    if index:
        weight_map = {name: file for file, file_names in halves.items() for name in file_names}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(params=["single-file", "indexed-files", "unindexed-files"])
def model_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "single-file":
        save_file(TENSORS, tmp_path / "model.safetensors")
    else:
        _write_split(tmp_path, index=request.param == "indexed-files")
    return tmp_path


def _per_rank(
    model_dir: Path, world_size: int, read: Callable[[Weights], torch.Tensor], **kwargs
) -> list[torch.Tensor]:
    """What each rank of a ``world_size`` group reads, in rank order."""
    parts = []
    for rank in range(world_size):
        with Weights(
            model_dir, TensorParallel(rank, world_size, None), torch.float32, torch.device("cpu"), **kwargs
        ) as w:
            parts.append(read(w))
    return parts


def _one_rank(model_dir: Path, **kwargs) -> Weights:
    return Weights(model_dir, TensorParallel(0, 1, None), torch.float32, torch.device("cpu"), **kwargs)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_get_returns_the_whole_tensor_on_every_rank(model_dir: Path, world_size: int) -> None:
    for part in _per_rank(model_dir, world_size, lambda w: w.get("layer.bias")):
        assert torch.equal(part, TENSORS["layer.bias"])


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize(
    ("name", "dim"), [("layer.weight", 0), ("layer.weight", 1), ("layer.weight", -1), ("layer.bias", 0)]
)
def test_get_sharded_slices_concatenate_to_the_stored_tensor(
    model_dir: Path, world_size: int, name: str, dim: int
) -> None:
    full = TENSORS[name]
    parts = _per_rank(model_dir, world_size, lambda w: w.get_sharded(name, dim))
    assert {part.shape[dim] for part in parts} == {full.shape[dim] // world_size}
    assert torch.equal(torch.cat(parts, dim=dim), full)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_get_heads_gives_each_rank_its_share_of_heads(model_dir: Path, world_size: int) -> None:
    full = TENSORS["attn.q.weight"]
    parts = _per_rank(model_dir, world_size, lambda w: w.get_heads("attn.q.weight", 0, NUM_HEADS, HEAD_DIM))
    assert {part.shape[0] for part in parts} == {NUM_HEADS // world_size * HEAD_DIM}
    assert torch.equal(torch.cat(parts), full)


def test_get_heads_replicates_kv_heads_over_ranks_when_fewer_heads_than_ranks(model_dir: Path) -> None:
    full = TENSORS["attn.k.weight"]
    head = [full[:HEAD_DIM], full[HEAD_DIM:]]
    parts = _per_rank(model_dir, 4, lambda w: w.get_heads("attn.k.weight", 0, NUM_KV_HEADS, HEAD_DIM))
    for part, expected in zip(parts, [head[0], head[0], head[1], head[1]], strict=True):
        assert torch.equal(part, expected)


@pytest.mark.parametrize(
    ("num_heads", "world_size", "message"),
    [(NUM_HEADS, 3, "4 heads does not divide over 3 ranks"), (NUM_KV_HEADS, 3, "cannot be replicated evenly")],
)
def test_get_heads_refuses_heads_that_do_not_spread_evenly(
    model_dir: Path, num_heads: int, world_size: int, message: str
) -> None:
    name = "attn.q.weight" if num_heads == NUM_HEADS else "attn.k.weight"
    with pytest.raises(WeightsError, match=message):
        _per_rank(model_dir, world_size, lambda w: w.get_heads(name, 0, num_heads, HEAD_DIM))


def test_get_heads_refuses_a_size_that_is_not_heads_times_head_dim(model_dir: Path) -> None:
    with _one_rank(model_dir) as w, pytest.raises(WeightsError, match=r"'attn.q.weight'.*size 16 .* not 3 heads × 4"):
        w.get_heads("attn.q.weight", 0, 3, HEAD_DIM)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_get_packed_sharded_takes_this_ranks_part_of_every_block(model_dir: Path, world_size: int) -> None:
    full = TENSORS["attn.qkv.weight"]
    parts = _per_rank(model_dir, world_size, lambda w: w.get_packed_sharded("attn.qkv.weight", 0, QKV_BLOCKS))
    blocks = full.split(QKV_BLOCKS)
    for rank, part in enumerate(parts):
        expected = torch.cat([block.chunk(world_size)[rank] for block in blocks])
        assert torch.equal(part, expected)


def test_get_packed_sharded_refuses_blocks_that_do_not_add_up_or_divide(model_dir: Path) -> None:
    with pytest.raises(WeightsError, match=r"'attn.qkv.weight'.*add up to 24, not the size 32"):
        _per_rank(model_dir, 1, lambda w: w.get_packed_sharded("attn.qkv.weight", 0, [16, 8]))
    with pytest.raises(WeightsError, match=r"'attn.qkv.weight'.*block of 6 does not divide over 4 ranks"):
        _per_rank(model_dir, 4, lambda w: w.get_packed_sharded("attn.qkv.weight", 0, [20, 6, 6]))


@pytest.mark.parametrize(("world_size", "block"), [(1, 10), (2, 5), (4, 3), (8, 2)])
def test_get_vocab_sharded_pads_the_last_blocks_with_zeros(model_dir: Path, world_size: int, block: int) -> None:
    full = TENSORS["model.embed_tokens.weight"]
    parts = _per_rank(model_dir, world_size, lambda w: w.get_vocab_sharded("model.embed_tokens.weight"))
    assert {tuple(part.shape) for part in parts} == {(block, 3)}
    gathered = torch.cat(parts)
    assert torch.equal(gathered[:VOCAB], full)
    assert not gathered[VOCAB:].any()


def test_get_vocab_sharded_on_four_ranks_gives_the_last_rank_one_row_and_two_of_padding(model_dir: Path) -> None:
    last = _per_rank(model_dir, 4, lambda w: w.get_vocab_sharded("model.embed_tokens.weight"))[-1]
    assert torch.equal(last, torch.cat([TENSORS["model.embed_tokens.weight"][9:], torch.zeros(2, 3)]))


def test_get_vocab_sharded_along_dim_1(tmp_path: Path) -> None:
    save_file(
        {"lm_head.weight": torch.arange(30, dtype=torch.float32).reshape(3, VOCAB)}, tmp_path / "model.safetensors"
    )
    parts = _per_rank(tmp_path, 4, lambda w: w.get_vocab_sharded("lm_head.weight", dim=1))
    assert {tuple(part.shape) for part in parts} == {(3, 3)}
    assert torch.equal(torch.cat(parts, dim=1)[:, :VOCAB], torch.arange(30, dtype=torch.float32).reshape(3, VOCAB))


def test_aliases_stand_in_for_a_tied_lm_head(model_dir: Path) -> None:
    aliases = {"lm_head.weight": ["missing.weight", "model.embed_tokens.weight"]}
    embed = TENSORS["model.embed_tokens.weight"]
    with _one_rank(model_dir, aliases=aliases) as w:
        assert w.has("lm_head.weight")
        assert torch.equal(w.get("lm_head.weight"), embed)
    parts = _per_rank(model_dir, 2, lambda w: w.get_vocab_sharded("lm_head.weight"), aliases=aliases)
    assert torch.equal(torch.cat(parts), embed)


def test_a_stored_name_wins_over_its_aliases(model_dir: Path) -> None:
    with _one_rank(model_dir, aliases={"layer.bias": ["positions"]}) as w:
        assert torch.equal(w.get("layer.bias"), TENSORS["layer.bias"])


def test_floating_point_tensors_take_the_dtype_and_others_keep_theirs(model_dir: Path) -> None:
    tp = TensorParallel(1, 2, None)
    with Weights(model_dir, tp, torch.bfloat16, torch.device("cpu")) as w:
        assert w.get("layer.weight").dtype == torch.bfloat16
        assert w.get_sharded("layer.weight", 0).dtype == torch.bfloat16
        assert w.get_vocab_sharded("model.embed_tokens.weight").dtype == torch.bfloat16
        assert w.get("positions").dtype == torch.int64
        assert torch.equal(w.get_sharded("positions", 0), torch.tensor([2, 3]))


def test_tensors_are_moved_to_the_device(model_dir: Path) -> None:
    with Weights(model_dir, TensorParallel(0, 2, None), torch.float16, torch.device("meta")) as w:
        assert w.get_sharded("layer.weight", 1).device.type == "meta"
        assert w.get("positions").device.type == "meta"


def test_a_missing_tensor_names_itself_its_aliases_and_the_folder(model_dir: Path) -> None:
    with _one_rank(model_dir, aliases={"lm_head.weight": ["out.weight"]}) as w:
        assert not w.has("lm_head.weight")
        with pytest.raises(WeightsError, match=r"'lm_head.weight' \(nor its aliases \['out.weight'\]\)") as error:
            w.get_sharded("lm_head.weight", 0)
    assert str(model_dir) in str(error.value)


def test_a_size_that_does_not_divide_names_the_tensor_and_sizes(model_dir: Path) -> None:
    with pytest.raises(WeightsError, match=r"'layer.bias' in .*size 8 along dim 0 does not divide over 3 ranks"):
        _per_rank(model_dir, 3, lambda w: w.get_sharded("layer.bias", 0))


def test_a_dimension_the_tensor_lacks_is_an_error(model_dir: Path) -> None:
    with _one_rank(model_dir) as w, pytest.raises(WeightsError, match=r"'layer.bias'.*shape \[8\] has no dim 1"):
        w.get_sharded("layer.bias", 1)


def test_a_folder_of_bin_weights_points_to_convert_to_safetensors(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        WeightsError, match=r"only PyTorch \.bin weights; run `text-generation-server convert-to-safetensors"
    ):
        _one_rank(tmp_path)


def test_a_folder_without_weights_or_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=re.escape(f"no .safetensors weights in {tmp_path}")):
        _one_rank(tmp_path)
    with pytest.raises(WeightsError, match="does not exist"):
        _one_rank(tmp_path / "absent")


def test_an_index_naming_an_absent_file_is_an_error(tmp_path: Path) -> None:
    _write_split(tmp_path, index=True)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"puts tensor '.*' in model-00002-of-00002.safetensors, which is not in"):
        _one_rank(tmp_path)


def test_a_tensor_in_two_unindexed_files_is_ambiguous(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(WeightsError, match=r"'w' is in both a\.safetensors and b\.safetensors"):
        _one_rank(tmp_path)


class _SpyFile:
    """Wraps a safe_open handle, recording whole-tensor reads and the ranges asked of slices."""

    def __init__(self, handle, log: dict[str, list]) -> None:
        self._handle, self._log = handle, log

    def keys(self) -> list[str]:
        return self._handle.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        self._log["get_tensor"].append(name)
        return self._handle.get_tensor(name)

    def get_slice(self, name: str) -> _SpySlice:
        return _SpySlice(name, self._handle.get_slice(name), self._log)

    def __exit__(self, *exc_info) -> None:
        self._log["closed"].append(self)
        self._handle.__exit__(*exc_info)


class _SpySlice:
    def __init__(self, name: str, inner, log: dict[str, list]) -> None:
        self._name, self._inner, self._log = name, inner, log

    def get_shape(self) -> list[int]:
        return self._inner.get_shape()

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor:
        self._log["slices"].append((self._name, index))
        return self._inner[index]


@pytest.fixture
def file_log(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    log: dict[str, list] = {"get_tensor": [], "slices": [], "closed": []}
    real_open = weights_module.safe_open
    monkeypatch.setattr(weights_module, "safe_open", lambda *args, **kwargs: _SpyFile(real_open(*args, **kwargs), log))
    return log


def test_sharded_reads_ask_the_file_for_this_ranks_range_only(model_dir: Path, file_log: dict[str, list]) -> None:
    with Weights(model_dir, TensorParallel(1, 4, None), torch.float32, torch.device("cpu")) as w:
        w.get_sharded("layer.weight", 1)
        w.get_heads("attn.k.weight", 0, NUM_KV_HEADS, HEAD_DIM)
        w.get_packed_sharded("attn.qkv.weight", 0, QKV_BLOCKS)
        w.get_vocab_sharded("model.embed_tokens.weight")
    assert file_log["get_tensor"] == []
    assert file_log["slices"] == [
        ("layer.weight", (slice(None), slice(3, 6))),
        ("attn.k.weight", (slice(0, 4),)),
        ("attn.qkv.weight", (slice(4, 8),)),
        ("attn.qkv.weight", (slice(18, 20),)),
        ("attn.qkv.weight", (slice(26, 28),)),
        ("model.embed_tokens.weight", (slice(3, 6),)),
    ]


def test_files_are_opened_once_and_closed_on_exit(model_dir: Path, file_log: dict[str, list]) -> None:
    with Weights(model_dir, TensorParallel(0, 1, None), torch.float32, torch.device("cpu")) as w:
        for name in TENSORS:
            w.get(name)
        opened = len(w._handles)
    assert opened == len(list(model_dir.glob("*.safetensors")))
    assert len(file_log["closed"]) == opened
    assert w._handles == {}


def _grouped_qkv(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, list, list, list]:
    """A Falcon-style fused projection: per KV group, its query heads, then a key and a value head."""
    per_group = num_heads // num_kv_heads
    rows, queries, keys, values = [], [], [], []
    for group in range(num_kv_heads):
        q = [torch.full((head_dim, 2), float(100 * group + h)) for h in range(per_group)]
        k, v = torch.full((head_dim, 2), -1.0 - group), torch.full((head_dim, 2), -100.0 - group)
        rows += [*q, k, v]
        queries += q
        keys.append(k)
        values.append(v)
    return torch.cat(rows), queries, keys, values


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "world_size"), [(8, 2, 2), (8, 2, 4), (4, 1, 2), (4, 4, 2)])
def test_get_head_groups_gives_each_rank_its_queries_and_their_groups_kv(
    tmp_path: Path, num_heads: int, num_kv_heads: int, world_size: int
) -> None:
    head_dim = 3
    fused, queries, keys, values = _grouped_qkv(num_heads, num_kv_heads, head_dim)
    save_file({"qkv.weight": fused}, tmp_path / "model.safetensors")
    per_rank, per_group = num_heads // world_size, num_heads // num_kv_heads
    for rank in range(world_size):
        with Weights(tmp_path, TensorParallel(rank, world_size, None), torch.float32, torch.device("cpu")) as w:
            got = w.get_head_groups("qkv.weight", 0, num_heads, num_kv_heads, head_dim)
        heads = range(rank * per_rank, (rank + 1) * per_rank)
        groups = sorted({h // per_group for h in heads})
        expected = torch.cat([queries[h] for h in heads] + [keys[g] for g in groups] + [values[g] for g in groups])
        assert torch.equal(got, expected)
