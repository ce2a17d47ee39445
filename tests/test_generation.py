"""compressors.generation's text helpers: the one "pad, generate, cut at the stop ids" every writer uses."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from ctxzip.compressors.generation import cut_at_stops, generate_rows
from ctxzip.compressors.padding import left_pad, right_pad


def test_cut_at_stops_keeps_what_precedes_the_first_stop() -> None:
    rows = [[5, 6, 2, 7], [8, 9], [3, 2], []]
    assert cut_at_stops(rows, [2, 3]) == [[5, 6], [8, 9], [], []]
    assert cut_at_stops(rows, 9) == [[5, 6, 2, 7], [8], [3, 2], []]
    assert cut_at_stops(rows, None) == rows


def test_padding_aligns_the_last_token_left_and_the_first_right() -> None:
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = right_pad([[1, 2, 3], [4]], value=-100)
    assert ids.tolist() == [[1, 2, 3], [4, -100, -100]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_generate_rows_equals_generating_each_row_alone_and_keeps_the_training_mode(tiny) -> None:
    model, tokenizer = tiny()
    model.train()
    prompts = [[5, 9, 13, 17, 21], [30, 31]]
    stop = 7
    settings = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=[stop],
                                pad_token_id=tokenizer.pad_token_id)
    batched = generate_rows(model, prompts, settings)
    assert model.training  # restored
    model.eval()
    for prompt, reply in zip(prompts, batched):
        with torch.no_grad():
            alone = model.generate(input_ids=torch.tensor([prompt]), generation_config=settings)[0, len(prompt):]
        assert reply == cut_at_stops([alone.tolist()], stop)[0]
        assert stop not in reply and len(reply) <= 6
