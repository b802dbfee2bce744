"""The chat format: exact loss masks, completion prompts, and the mid/SFT batch loader."""

import pytest

from nanochat.chat import ChatLoader, ConversationError, render_conversation, render_for_completion

TOOL_CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 times 7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute: "},
        {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": "It is 84."},
    ]},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]}


def test_mask_covers_exactly_the_assistant_tokens(tokenizer):
    sp, enc = tokenizer.encode_special, tokenizer.encode
    ids, mask = render_conversation(tokenizer, TOOL_CONVERSATION)
    expected = [
        ([tokenizer.bos_token_id, sp("<|user_start|>"), *enc("Be brief.\n\nWhat is 12 times 7?"), sp("<|user_end|>"),
          sp("<|assistant_start|>")], 0),
        ([*enc("Let me compute: "), sp("<|python_start|>"), *enc("12*7"), sp("<|python_end|>")], 1),
        ([sp("<|output_start|>"), *enc("84"), sp("<|output_end|>")], 0),  # written by the tool, not the model
        ([*enc("It is 84."), sp("<|assistant_end|>")], 1),
        ([sp("<|user_start|>"), *enc("Thanks"), sp("<|user_end|>"), sp("<|assistant_start|>")], 0),
        ([*enc("You are welcome."), sp("<|assistant_end|>")], 1),
    ]
    assert ids == [t for tokens, _ in expected for t in tokens]
    assert mask == [m for tokens, m in expected for _ in tokens]


def test_completion_prompt_drops_the_reference_answer(tokenizer):
    prompt = render_for_completion(tokenizer, TOOL_CONVERSATION)
    full, _ = render_conversation(tokenizer, TOOL_CONVERSATION)
    answer = tokenizer.encode("You are welcome.") + [tokenizer.encode_special("<|assistant_end|>")]
    assert prompt + answer == full


@pytest.mark.parametrize("bad", [
    {"messages": []},
    {"messages": [{"role": "assistant", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "shell", "text": "ls"}]}]},
])
def test_malformed_conversations_are_refused(tokenizer, bad):
    with pytest.raises(ConversationError):
        render_conversation(tokenizer, bad)


def conversations(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i} " * (i % 5 + 1)}]}
            for i in range(n)]


@pytest.mark.parametrize("pack", [True, False])
def test_loader_targets_follow_the_mask(tokenizer, pack):
    convs = conversations(20)
    loader = ChatLoader(convs, tokenizer, batch_size=3, seq_len=24, pack=pack, seed=1)
    x, y = next(loader)
    assert x.shape == y.shape and x.size(0) == 3
    if pack:
        assert x.size(1) == 24
    assert (x[:, 1:] == y[:, :-1]).logical_or(y[:, :-1] == -1).all()  # targets are the inputs shifted by one
    first_ids, first_mask = render_conversation(tokenizer, convs[loader._order()[0]], max_tokens=25)
    assert y[0, : len(first_ids) - 1].tolist() == [t if m else -1 for t, m in zip(first_ids[1:], first_mask[1:], strict=True)]


def test_loader_resumes_exactly_and_shards_by_rank(tokenizer):
    convs = conversations(30)
    loader = ChatLoader(convs, tokenizer, batch_size=2, seq_len=16, pack=False, seed=3)
    for _ in range(20):  # crosses an epoch boundary (30 conversations / 2 per batch = 15 batches)
        next(loader)
    resumed = ChatLoader(convs, tokenizer, batch_size=2, seq_len=16, pack=False, seed=3, state=loader.state_dict())
    for _ in range(3):
        a, b = next(loader), next(resumed)
        assert a[0].equal(b[0]) and a[1].equal(b[1])
    ranks = [set(ChatLoader(convs, tokenizer, 1, 16, rank=r, world=2, seed=3)._order()) for r in (0, 1)]
    assert not ranks[0] & ranks[1] and len(ranks[0] | ranks[1]) == 30
