"""Evaluation split over real torch.distributed (gloo) processes: validation bits per byte, the fine-tuning
loss, RL pass@1, CORE and chat-eval accuracy. Two routes to one answer: every rank of a 2- or 3-process
run returns what one plain process returns on the same data."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.dataloader import DataLoader
from nanochat.dataset import list_shards, split_shards
from nanochat.eval.core import Example, ModelScorer, Task, evaluate_core
from nanochat.infer.engine import Engine
from nanochat.scripts import chat_eval
from nanochat.tasks.base import Task as ChatTask
from nanochat.tasks.base import exchange
from nanochat.tokenizer import Tokenizer
from nanochat.train import base, finetune, rl
from nanochat.train.loop import build_run
from tests.test_chat_eval import PLAN, LetterTask, random_gpt
from tests.test_data_parallel import free_port

# bits per byte: each batch's losses are bit-identical in every process (one thread each), only the
# float64 sums are added in another order
BPB_TOLERANCE = 1e-9
# the fine-tuning loss is summed in float32, as one process does it: another order moves the last bits
LOSS_TOLERANCE = 1e-6
STEPS = 7  # validation batches: uneven shares over 2 and 3 ranks


class CountdownTask(ChatTask):
    """Generative: graded on the answer's length and the problem's index, so pass@1 changes if a problem
    is answered twice, skipped, or answered differently."""

    name, eval_type = "countdown", "generative"

    def __len__(self) -> int:
        return 12

    def get(self, i: int) -> dict:
        return exchange(f"Count down from {i}", " ".join(str(k) for k in range(i, -1, -1)), index=i)

    def evaluate(self, conversation: dict, response: str) -> bool:
        return (len(response) + conversation["index"]) % 3 != 0


def core_tasks() -> list[Task]:
    """A multiple-choice and a schema task scored by a random model: about a third right, never all."""
    numbers = [Example([f"Count: {i} {i + 1} {i + 2}"], [f" {i + 3}", f" {i + 7}", f" {2 * i}"], gold=0) for i in range(11)]
    names = [Example([f"{a} gave it to", f"{b} gave it to"], [f" the one who asked for {a}."], gold=0)
             for a, b in itertools.pairwise(["Adam", "Eve", "Noah", "Moses", "Ruth", "Saul", "David", "Esther", "Job"])]
    return [Task("numbers", "multiple_choice", numbers, num_fewshot=1), Task("names", "schema", names)]


def evaluations(data_dir: str, tokenizer_dir: str, world_size: int = 1, rank: int = 0) -> dict:
    """Every evaluation this file checks, as rank `rank` of the default process group (or one process)."""
    cpu = torch.device("cpu")
    cfg = base.BaseTrainConfig(device="cpu", dtype="float32", data_dir=data_dir, tokenizer_dir=tokenizer_dir, depth=1,
                               head_dim=32, max_seq_len=32, device_batch_size="2", total_batch_size=-1,
                               eval_tokens=STEPS * 2 * 32, compile="off")
    base_run = base.setup(cfg, cpu, world_size, rank)
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = random_gpt(tokenizer.vocab_size, sequence_len=64)
    conversations = [LetterTask(7)[i] for i in range(7)]  # 7 conversations, 2 per batch: the last batch wraps

    def run_of(kind: type, cfg, **fields) -> object:
        return build_run(kind, cfg, cpu, PLAN, tokenizer, model, 1, tokens_per_step=0, num_iterations=1,
                         world_size=world_size, rank=rank, meta={"init_from": ""}, **fields)

    finetune_losses = {
        config.STAGE: run_of(finetune.FinetuneRun, config(device_batch_size=2), val_conversations=conversations).evaluate()
        for config in (finetune.MidTrainConfig, finetune.ChatSFTConfig)
    }
    rl_run = run_of(rl.RLRun, rl.ChatRLConfig(eval_problems=7, max_new_tokens=6), task=CountdownTask(),
                    engine=Engine(model, tokenizer, PLAN))
    return {
        "val_bpb": base_run.evaluate()["val_bpb"],
        "finetune": finetune_losses,
        "rl": rl_run.evaluate(),
        "core": evaluate_core(core_tasks(), ModelScorer(model, tokenizer, PLAN, cpu), max_examples=10, progress=False),
        "chat": chat_eval.evaluate_task(LetterTask(12), chat_eval.categorical_answers(model, tokenizer, PLAN),
                                        max_problems=10, batch_size=3, progress=False),
    }


def _worker(rank: int, ports: dict[int, int], out: str, kwargs: dict) -> None:
    """`evaluations` in a gloo group of each size in `ports` (largest first) that holds this rank; rank 0
    saves every rank's results. One set of processes serves every size: a process start costs seconds."""
    torch.set_num_threads(1)  # as the single process: the same matmul kernels, the same bits per batch
    gathered: dict[int, list] = {}
    for world_size, port in ports.items():
        if rank >= world_size:
            break
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        try:
            gathered[world_size] = [None] * world_size
            dist.all_gather_object(gathered[world_size], evaluations(world_size=world_size, rank=rank, **kwargs))
        finally:
            dist.destroy_process_group()
    if rank == 0:
        torch.save(gathered, out)


@pytest.fixture(scope="module")
def single(data_dir, tokenizer_dir) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluations(str(data_dir), str(tokenizer_dir))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranks(data_dir, tokenizer_dir, tmp_path_factory) -> list[dict]:
    """Every rank's results, of 3 ranks and then of 2."""
    out = str(tmp_path_factory.mktemp("ranks") / "results.pt")
    ports = {3: free_port(), 2: free_port()}
    mp.spawn(_worker, args=(ports, out, {"data_dir": str(data_dir), "tokenizer_dir": str(tokenizer_dir)}), nprocs=max(ports))
    gathered = torch.load(out, weights_only=False)
    assert sorted(gathered) == [2, 3]
    return gathered[3] + gathered[2]


def test_batch_split_loaders_interleave_to_the_one_stream(data_dir, tokenizer):
    shards = split_shards(list_shards(data_dir), "val")
    whole = list(itertools.islice(DataLoader(shards, tokenizer, 2, 32, prefetch=0), 7))
    shares = [list(itertools.islice(DataLoader(shards, tokenizer, 2, 32, batch_split=(r, 3)), len(range(r, 7, 3))))
              for r in range(3)]
    for i, (x, y) in enumerate(whole):
        mine_x, mine_y = shares[i % 3][i // 3]
        assert torch.equal(mine_x, x) and torch.equal(mine_y, y)
    with pytest.raises(ValueError, match="takes no state"):
        DataLoader(shards, tokenizer, 2, 32, batch_split=(1, 2), state={"epoch": 0, "shard": 0, "row_group": 0, "offset": 0})


def test_every_rank_returns_the_single_process_bits_per_byte(ranks, single):
    for result in ranks:
        assert result["val_bpb"] == pytest.approx(single["val_bpb"], rel=BPB_TOLERANCE)


def test_every_rank_returns_the_single_process_finetune_loss(ranks, single):
    assert set(single["finetune"]) == {"mid", "sft"}
    for result in ranks:
        for stage, loss in single["finetune"].items():
            assert result["finetune"][stage]["val_loss"] == pytest.approx(loss["val_loss"], rel=LOSS_TOLERANCE)


def test_every_rank_returns_the_single_process_pass_at_1(ranks, single):
    assert 0 < single["rl"]["pass_at_1"] < 1, "all or nothing solved would not show a problem counted twice"
    assert all(result["rl"] == single["rl"] for result in ranks)


def test_every_rank_returns_the_single_process_core_and_chat_counts(ranks, single):
    assert all(0 < task["accuracy"] < 1 for task in single["core"]["tasks"].values())
    assert 0 < single["chat"]["correct"] < single["chat"]["n"] and single["chat"]["too_long"] > 0
    for result in ranks:
        assert result["core"] == single["core"] and result["chat"] == single["chat"]
