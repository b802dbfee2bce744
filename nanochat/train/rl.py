"""Reinforcement learning on problems with a checkable answer (GSM8K-style), as upstream nanochat does it.

Plain on-policy policy gradient without a KL term or a critic (upstream nanochat's simplification
of GRPO): for each problem sample --num-samples answers (calculator included), reward 1 for the
right final number, advantage = reward - the mean of its group, and minimize -advantage x
log-probability over the tokens the model chose (tool outputs are forced, not chosen, so they carry
no gradient). The step is the same TrainStep as every other stage; the loop is its own (`train`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm import tqdm

from nanochat.chat import Conversation, render_for_completion
from nanochat.config import option
from nanochat.distributed import sum_counts, world
from nanochat.infer.engine import Engine
from nanochat.runlog import progress_bar
from nanochat.tasks import Task, load_task
from nanochat.train.finetune import StartFromConfig, load_start, resolve_start
from nanochat.train.loop import Run, build_run, start_process
from nanochat.train.step import lr_multiplier, set_schedule


@dataclass
class ChatRLConfig(StartFromConfig):
    STAGE: ClassVar[str] = "rl"
    PREVIOUS: ClassVar[str] = "sft"

    task: str = option("arithmetic", "task with a checkable answer (see nanochat/tasks), e.g. arithmetic")
    eval_problems: int = option(64, "problems held out (the task's first N) for greedy pass@1")
    examples_per_step: int = option(8, "problems per optimizer step, per worker")
    num_samples: int = option(8, "answers sampled per problem (the group the advantage is relative to)")
    device_batch_size: int = option(8, "sampled answers per forward/backward")
    max_new_tokens: int = option(128, "longest answer sampled")
    temperature: float = option(1.0, "sampling temperature")
    top_k: int = option(50, "sample among the k most likely tokens")
    num_iterations: int = option(200, "optimizer steps")
    init_lr_frac: float = option(0.05, "learning rates as a fraction of the base ones")
    eval_every: int = option(50, "greedy pass@1 on the held-out problems every N steps (and at the end)")
    save_every: int = option(100, "checkpoint every N steps (and at the end)")


@dataclass(kw_only=True)
class RLRun(Run):
    task: Task | None = None
    engine: Engine | None = None

    def describe(self) -> str:
        c = self.cfg
        return f"starting from {self.meta['init_from']}\n{c.examples_per_step} problems x {c.num_samples} samples per step, {c.num_iterations} steps, task {c.task}"

    def problem(self, index: int) -> Conversation:
        """Training problems come after the held-out ones and cycle through the task."""
        held_out = self.cfg.eval_problems
        return self.task[held_out + index % (len(self.task) - held_out)]

    def answer(self, conversation: Conversation, tokens: list[int], prompt_len: int) -> str:
        answer = tokens[prompt_len:]
        if answer and answer[-1] in self.engine.stop_ids:
            answer = answer[:-1]
        return self.tokenizer.decode(answer)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy pass@1 on the held-out problems. Collective under a process group: rank r answers
        problems r, r+W, ... and the solved counts are summed."""
        self.model.eval()
        solved = 0
        rank, world_size = world()
        for i in range(rank, self.cfg.eval_problems, world_size):
            conversation = self.task[i]
            prompt = render_for_completion(self.tokenizer, conversation)
            tokens, _ = self.engine.generate_batch(prompt, 1, max_tokens=self.cfg.max_new_tokens, temperature=0.0)
            solved += self.task.evaluate(conversation, self.answer(conversation, tokens[0], len(prompt)))
        self.model.train()
        (solved,) = sum_counts([solved])
        return {"pass_at_1": solved / max(self.cfg.eval_problems, 1)}

    def rollouts(self, conversation: Conversation, seed: int) -> tuple[list, float]:
        """Sample a group of answers to one problem and turn them into weighted (x, y, w) micro-batches."""
        cfg = self.cfg
        prompt = render_for_completion(self.tokenizer, conversation)
        self.model.eval()
        with torch.no_grad():
            seqs, masks = self.engine.generate_batch(prompt, cfg.num_samples, max_tokens=cfg.max_new_tokens,
                                                     temperature=cfg.temperature, top_k=cfg.top_k, seed=seed)
        self.model.train()
        rewards = torch.tensor([self.task.reward(conversation, self.answer(conversation, s, len(prompt))) for s in seqs])
        advantages = rewards - rewards.mean()
        width = max(len(s) for s in seqs) - 1
        x = torch.full((len(seqs), width), self.tokenizer.bos_token_id, dtype=torch.long)
        y = torch.full((len(seqs), width), -1, dtype=torch.long)
        for r, (seq, mask) in enumerate(zip(seqs, masks, strict=True)):
            x[r, : len(seq) - 1] = torch.tensor(seq[:-1])
            y[r, : len(seq) - 1] = torch.tensor([t if m else -1 for t, m in zip(seq[1:], mask[1:], strict=True)])
        chosen = (y != -1).float()
        # mean over the group's chosen tokens of -advantage x log p, i.e. nll x advantage; TrainStep
        # divides every micro-batch by grad_accum, which counts micro-batches, not problems: undo that
        micro = math.ceil(len(seqs) / cfg.device_batch_size)
        w = chosen * advantages[:, None] * micro / chosen.sum().clamp(min=1)
        batches = [(x[i : i + cfg.device_batch_size].to(self.device), y[i : i + cfg.device_batch_size].to(self.device),
                    w[i : i + cfg.device_batch_size].to(self.device)) for i in range(0, len(seqs), cfg.device_batch_size)]
        return batches, rewards.mean().item()


class Problems:
    """This worker's stream of training problem indices; `position` resumes it."""

    def __init__(self, rank: int, world: int, state: dict | None = None):
        self.rank, self.world = rank, world
        self.index = state["index"] if state else rank

    def __iter__(self) -> Problems:
        return self

    def __next__(self) -> int:
        index, self.index = self.index, self.index + self.world
        return index

    def state_dict(self) -> dict:
        return {"index": self.index}


def setup(cfg: ChatRLConfig, device: torch.device, world_size: int = 1, rank: int = 0) -> RLRun:
    cfg = resolve_start(cfg)  # the start checkpoint's step dir, and its tokenizer unless --tokenizer-dir names one
    plan, tokenizer = start_process(cfg, device)
    model, start = load_start(cfg, device, tokenizer)
    grad_accum = cfg.examples_per_step * math.ceil(cfg.num_samples / cfg.device_batch_size)
    task = load_task(cfg.task)
    if len(task) <= cfg.eval_problems:
        raise ValueError(f"task {cfg.task!r} has {len(task)} problems; --eval-problems {cfg.eval_problems} leaves none to train on")
    # eager (compile "off"): every rollout has its own length
    return build_run(RLRun, cfg, device, plan, tokenizer, model, grad_accum, lr_frac=cfg.init_lr_frac,
                     tokens_per_step=0, num_iterations=cfg.num_iterations, world_size=world_size, rank=rank,
                     meta={"init_from": str(start)}, task=task, engine=Engine(model, tokenizer, plan))


def problem_stream(run: RLRun, rank: int = 0, world: int = 1, position: dict | None = None) -> Problems:
    return Problems(rank, world, position)


def train(run: RLRun, problems: Iterator[int], start_step: int, log: Callable[[dict], None], save: Callable[[int], None]) -> dict:
    cfg, n = run.cfg, run.num_iterations
    evaluated, started, record = {}, time.perf_counter(), {}
    bar = progress_bar(range(start_step, n), initial=start_step, total=n, desc="rl", dynamic_ncols=True, disable=not run.is_main)
    for step in bar:
        lrm = lr_multiplier(step, n, 0.0, 1.0, 0.0)  # linear decay to zero, as upstream's RL
        set_schedule(run.optimizer, lrm, momentum=0.95)
        t0 = time.perf_counter()
        batches, rewards = [], []
        for _ in range(cfg.examples_per_step):
            index = next(problems)
            micro, reward = run.rollouts(run.problem(index), seed=cfg.seed * 1_000_003 + index)
            batches += micro
            rewards.append(reward)
        result = run.step_fn(iter(batches))
        done = step + 1
        record = {"step": done, "loss": result.loss, "reward": sum(rewards) / len(rewards), "lr_mult": lrm,
                  "seconds": time.perf_counter() - t0, "loss_scale": result.scale, "skipped": result.skipped,
                  "grad_norm": result.grad_norm}
        if done == n or (cfg.eval_every > 0 and done % cfg.eval_every == 0):  # every rank: evaluate() is split over them
            evaluated = run.evaluate()
            record.update(evaluated)
            if run.is_main:
                tqdm.write(f"step {done}: pass@1 {evaluated['pass_at_1']:.3f}")
        log(record)
        bar.set_postfix_str(f"reward {record['reward']:.3f}", refresh=False)
        if done == n or (cfg.save_every > 0 and done % cfg.save_every == 0):
            save(done)
    bar.close()
    return {"stage": "rl", "steps": n, "final_loss": record.get("loss"), "final_reward": record.get("reward"), **evaluated,
            "wall_time_s": time.perf_counter() - started, "skipped_steps": run.step_fn.skipped_total,
            "loss_scale": run.scaler.get_scale() if run.scaler else None, "params": run.model.num_params(), "world_size": run.world_size,
            "peak_memory_gib": torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None,
            "plan": run.plan.to_dict()}
