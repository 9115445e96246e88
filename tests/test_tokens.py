"""Prompt layouts token-exact against hand-written id lists, special-id resolution, image blocks.

Expected ids are spelled from the tiny layout (tiny.py): specials below, text = one id per UTF-8 byte
(the tiny BPE has no merges), image id = 336 + code. Nothing here calls Tokens.encode to build an
expectation, so a template that drifts by one space or one token fails.
"""

import dataclasses
import json
import logging

import pytest
import torch
from tokenizers import Tokenizer

from llada2uni.tiny import tiny_config, write_tiny_tokenizer
from llada2uni.tokens import SpecialIds, TokenError, Tokens, align_rows

EOS, MASK, ROLE, EROLE, SOI, EOI, BOI, ROLE_END = 256, 257, 258, 259, 261, 262, 263, 264
OFFSET = 336


def R(n):  # <|reserved_token_n|>
    return 265 + n


def img(*codes):
    return [OFFSET + c for c in codes]


def _byte_to_id():
    # GPT-2 byte -> unicode map; the tiny vocab is the sorted set of those symbols.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    order = sorted(symbols.values())
    return {b: order.index(s) for b, s in symbols.items()}


BYTE = _byte_to_id()


def t(text):
    return [BYTE[b] for b in text.encode("utf-8")]


# "<uncondition>" is no special token in the real tokenizer (nor in the tiny one): plain text
UNC_IDS = t("<uncondition>")


def SYS(x):
    return [ROLE] + t("SYSTEM") + [EROLE] + t(f" {x} ")


HUMAN = [258, 39, 52, 44, 32, 45, 259]  # <role>HUMAN</role>, spelled out
ASSIST = [ROLE] + t("ASSISTANT") + [EROLE]
UND = SYS("You are a multimodal understanding assistant.")
T2I = SYS("You are a text-to-image generation assistant.")
THINK_SYS = "You are a text-to-image generation assistant with a thinking process."
EDIT = SYS("You are an image editing assistant.")
INTER = SYS("You are a interleaved generation assistant.")


def HDR(h, w):
    return [SOI, R(h), R(w), BOI]


IMG_A = img(0, 1, 2, 3, 4, 5)  # a 2x3 grid
IMG_B = img(127, 9)  # a 1x2 grid
BLOCK_A = HDR(2, 3) + IMG_A + [EOI]
BLOCK_B = HDR(1, 2) + IMG_B + [EOI]


@pytest.fixture
def tok_dir(tmp_path):
    write_tiny_tokenizer(tmp_path)
    return tmp_path


@pytest.fixture
def tok(tok_dir):
    return Tokens.from_pretrained(tok_dir, tiny_config())


def tokenizer_without(tok_dir, string):
    raw = json.loads((tok_dir / "tokenizer.json").read_text())
    raw["added_tokens"] = [a for a in raw["added_tokens"] if a["content"] != string]
    raw["model"]["vocab"].pop(string)
    return Tokenizer.from_str(json.dumps(raw))


def test_text_helper_matches_tokenizer(tok):
    assert t("hi é") == [71, 72, 220, 127, 102]
    assert tok.encode("hi é") == t("hi é")  # no BOS
    assert tok.encode("<role>HUMAN</role>") == HUMAN


def test_special_ids_from_tokenizer(tok):
    assert tok.ids == SpecialIds(eos=256, pad=256, mask=257, soi=261, eoi=262, boi=263, role_open=258,
                                 role_close=259, image_offset=336, image_vocab_size=128)
    assert tok.ids.is_image(336) and tok.ids.is_image(463)
    assert not tok.ids.is_image(335) and not tok.ids.is_image(464)


def test_tokenizer_config_names_win(tok_dir, caplog):
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    with caplog.at_level(logging.WARNING, logger="llada2uni.tokens"):
        tokens = Tokens(tokenizer, tiny_config(), {"eos_token": {"content": "<|role_end|>"}})
    assert tokens.ids.eos == ROLE_END and tokens.ids.pad == ROLE_END  # pad defaults to the eos string
    assert "config says" in caplog.text  # the config's eos/pad 256 disagree: warned, tokenizer wins


def test_mask_falls_back_to_config(tok_dir, caplog):
    tokenizer = tokenizer_without(tok_dir, "<|mask|>")
    config = dataclasses.replace(tiny_config(), mask_token_id=300)
    with caplog.at_level(logging.WARNING, logger="llada2uni.tokens"):
        tokens = Tokens(tokenizer, config, {"mask_token": "<|mask|>"})
    assert tokens.ids.mask == 300
    assert "<|mask|>" in caplog.text


def test_eos_falls_back_to_config(tok_dir):
    tokenizer = tokenizer_without(tok_dir, "<|endoftext|>")
    tokens = Tokens(tokenizer, dataclasses.replace(tiny_config(), eos_token_id=[301, 302], pad_token_id=303))
    assert (tokens.ids.eos, tokens.ids.pad) == (301, 303)
    tokens = Tokens(tokenizer, dataclasses.replace(tiny_config(), eos_token_id=None, pad_token_id=303))
    assert tokens.ids.eos == 303


def test_tokenizer_and_config_disagree(tok_dir, caplog):
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    with caplog.at_level(logging.WARNING, logger="llada2uni.tokens"):
        tokens = Tokens(tokenizer, dataclasses.replace(tiny_config(), mask_token_id=300))
    assert tokens.ids.mask == MASK
    assert "mask" in caplog.text and "300" in caplog.text


@pytest.mark.parametrize("string", ["<|image|>", "<boi>", "</role>"])
def test_missing_structural_token(tok_dir, string):
    with pytest.raises(TokenError, match=string.replace("|", r"\|")):
        Tokens(tokenizer_without(tok_dir, string), tiny_config())


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(TokenError, match="tokenizer.json"):
        Tokens.from_pretrained(tmp_path, tiny_config())


def test_image_block(tok):
    assert tok.image_header(2, 3) == [261, 267, 268, 263]
    assert tok.image_block(IMG_A, 2, 3) == [261, 267, 268, 263, 336, 337, 338, 339, 340, 341, 262]
    assert tok.image_block(torch.tensor(IMG_A).reshape(2, 3), 2, 3) == BLOCK_A


def test_image_block_errors(tok):
    with pytest.raises(TokenError, match="5 tokens but a 2x3 grid needs 6"):
        tok.image_block(IMG_A[:5], 2, 3)
    with pytest.raises(TokenError, match="outside the image range"):
        tok.image_block(IMG_A[:5] + [OFFSET + 128], 2, 3)
    with pytest.raises(TokenError, match="outside the image range"):
        tok.image_block([EOS] + IMG_A[1:], 2, 3)
    with pytest.raises(TokenError, match="raw codes"):
        tok.image_block([0, 1, 2, 3, 4, 5], 2, 3)
    with pytest.raises(TokenError, match="integers"):
        tok.image_block([336.0] * 6, 2, 3)
    with pytest.raises(TokenError, match="positive"):
        tok.image_header(0, 3)


def test_reserved_id(tok):
    assert tok.reserved_id(0) == 265 and tok.reserved_id(63) == 328
    with pytest.raises(TokenError, match="grid side 64 has no reserved token"):
        tok.reserved_id(64)
    with pytest.raises(TokenError, match="grid side 64"):
        tok.image_block(img(*[0] * 64), 1, 64)


def test_parse_image_header(tok):
    assert tok.parse_image_header(t("ok") + [SOI, R(5), R(7), BOI]) == (5, 7)
    assert tok.parse_image_header([SOI, R(5), R(7)]) is None
    assert tok.parse_image_header([SOI, R(5), 70, BOI]) is None
    assert tok.parse_image_header([EOI, R(5), R(7), BOI]) is None
    assert tok.parse_image_header([SOI, R(0), R(7), BOI]) is None


def test_understand_one_image(tok):
    # the official understand_image: image block then question, no chat turns
    assert tok.understand_prompt([(IMG_A, 2, 3)], "What?") == BLOCK_A + t("What?")
    expected = UND + HUMAN + BLOCK_A + t("What?") + ASSIST
    assert tok.understand_prompt([(IMG_A, 2, 3)], "What?", template="chat") == expected
    with pytest.raises(TokenError, match="template"):
        tok.understand_prompt([(IMG_A, 2, 3)], "What?", template="nope")


def test_understand_two_images(tok):
    assert tok.understand_prompt([(IMG_A, 2, 3), (IMG_B, 1, 2)], "Compare.") == BLOCK_A + BLOCK_B + t("Compare.")
    expected = UND + HUMAN + BLOCK_A + BLOCK_B + t("Compare.") + ASSIST
    assert tok.understand_prompt([(IMG_A, 2, 3), (IMG_B, 1, 2)], "Compare.", template="chat") == expected


def test_chat_matches_understand(tok):
    messages = [{"role": "system", "content": "ignored"},
                {"role": "user", "content": [{"type": "text", "text": "Compare."},
                                             {"type": "image", "tokens": IMG_A, "h": 2, "w": 3},
                                             {"type": "image", "tokens": IMG_B, "h": 1, "w": 2}]}]
    # one user turn with images: the official understanding layout; else the chat turns
    assert tok.chat_prompt(messages) == tok.understand_prompt([(IMG_A, 2, 3), (IMG_B, 1, 2)], "Compare.")
    assert tok.chat_prompt(messages, official_single_turn=False) == tok.understand_prompt(
        [(IMG_A, 2, 3), (IMG_B, 1, 2)], "Compare.", template="chat")


def test_chat_two_turns(tok):
    messages = [{"role": "user", "content": [{"type": "image", "tokens": IMG_A, "h": 2, "w": 3},
                                             {"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "Why?"}]
    expected = UND + HUMAN + BLOCK_A + t("Hi") + ASSIST + t("A cat.") + HUMAN + t("Why?") + ASSIST
    assert tok.chat_prompt(messages) == expected


def test_chat_errors(tok):
    with pytest.raises(TokenError, match="end with a user"):
        tok.chat_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(TokenError, match="role"):
        tok.chat_prompt([{"role": "tool", "content": "a"}])
    with pytest.raises(TokenError, match="missing 'h'"):
        tok.chat_prompt([{"role": "user", "content": [{"type": "image", "tokens": IMG_A, "w": 3}]}])


def test_t2i_prompts(tok):
    cond, uncond = tok.t2i_prompts("a dog", 4, 5)
    assert cond == T2I + HUMAN + t("a dog") + ASSIST + [261, 269, 270, 263]
    assert uncond == T2I + HUMAN + UNC_IDS + ASSIST + HDR(4, 5)


def test_thinking_phase1(tok):
    assert tok.thinking_prompt("a dog") == SYS(THINK_SYS) + HUMAN + t("a dog") + ASSIST


def test_thinking_phase2_continues_phase1_verbatim(tok):
    # The model thought "Hmm", wrote its own 7x9 header, then <boi> and some leftovers: phase 2
    # continues that output through its first <boi>, as the official code does; the requested
    # size only shapes the uncond row and the number of codes generated.
    out = t("Hmm") + [SOI, R(7), R(9), BOI] + t("x") + [EOS]
    cond, uncond = tok.thinking_image_prompts("a dog", out, 4, 5)
    assert cond == SYS(THINK_SYS) + HUMAN + t("a dog") + ASSIST + t("Hmm") + [SOI, R(7), R(9), BOI]
    # the uncond system turn has the spaces of the other turns (the official _build_chat)
    assert uncond == SYS(THINK_SYS) + HUMAN + UNC_IDS + ASSIST + HDR(4, 5)
    assert tok.thinking_text(out) == "Hmm"


def test_thinking_phase2_bare_boi_and_no_boi(tok):
    phase1 = SYS(THINK_SYS) + HUMAN + t("a") + ASSIST
    cond, _ = tok.thinking_image_prompts("a", t("ok") + [BOI], 2, 2)
    assert cond == phase1 + t("ok") + [BOI]
    for ended in (t("ok") + [EOS, BOI], t("ok")):  # EOS first, or no <boi> at all: an error
        with pytest.raises(TokenError, match="<boi>"):
            tok.thinking_image_prompts("a", ended, 2, 2)
    assert tok.thinking_text(torch.tensor(t("ok") + [SOI, R(3), BOI])) == "ok"


def test_align_rows_keeps_the_conditional_layout():
    rows, pads = align_rows([[1, 2, 3, 4], [7, 8], [5, 6, 7, 8, 9, 10]], 0)
    # shorter: left-padded; longer: cut on the left, as the official code does
    assert rows == [[1, 2, 3, 4], [0, 0, 7, 8], [7, 8, 9, 10]] and pads == [0, 2, 0]


def test_edit_prompts(tok):
    rows = tok.edit_prompts([(IMG_A, 2, 3)], "make it red", 2, 3, image_guidance=False)
    assert rows == [EDIT + HUMAN + BLOCK_A + t("make it red") + ASSIST + HDR(2, 3),
                    EDIT + HUMAN + BLOCK_A + UNC_IDS + ASSIST + HDR(2, 3)]
    rows = tok.edit_prompts([(IMG_A, 2, 3)], "make it red", 2, 3, image_guidance=True)
    assert len(rows) == 3
    assert rows[2] == EDIT + HUMAN + [SOI] + t("make it red") + ASSIST + HDR(2, 3)


def test_edit_multi_reference(tok):
    rows = tok.edit_prompts([(IMG_A, 2, 3), (IMG_B, 1, 2)], "merge", 3, 3, image_guidance=True)
    assert rows == [EDIT + HUMAN + BLOCK_A + BLOCK_B + t("merge") + ASSIST + HDR(3, 3),
                    EDIT + HUMAN + BLOCK_A + BLOCK_B + UNC_IDS + ASSIST + HDR(3, 3),
                    EDIT + HUMAN + [SOI, SOI] + t("merge") + ASSIST + HDR(3, 3)]
    with pytest.raises(TokenError, match="at least one"):
        tok.edit_prompts([], "x", 2, 2, image_guidance=False)


def test_interleave(tok):
    prompt = tok.interleave_prompt("story")
    assert prompt == INTER + HUMAN + t("story") + ASSIST
    assert tok.interleave_uncond_first(2, 3) == INTER + HUMAN + UNC_IDS + ASSIST + HDR(2, 3)

    history = prompt + t("one") + HDR(1, 2) + IMG_B + [EOI] + t("two")
    u, ui = tok.interleave_uncond_later(history, t("two"), 2, 3)
    assert u == prompt + t("one") + HDR(1, 2) + IMG_B + [EOI] + UNC_IDS + HDR(2, 3)
    assert ui == INTER + HUMAN + UNC_IDS + ASSIST + t("two") + HDR(2, 3)
    # a model-written header at the end of the current text is not doubled
    assert tok.interleave_uncond_later(history, t("two") + HDR(2, 3), 2, 3) == [u, ui]
    with pytest.raises(TokenError, match="interleave_uncond_first"):
        tok.interleave_uncond_later(prompt, t("x"), 2, 3)


def test_align_rows():
    rows, pads = align_rows([[1, 2, 3], [4], [5, 6]], 9)
    assert rows == [[1, 2, 3], [9, 9, 4], [9, 5, 6]]
    assert pads == [0, 2, 1]
    assert align_rows([], 9) == ([], [])


def test_decode_skips_specials_and_image_ids(tok):
    ids = [ROLE] + t("Hi") + [EROLE, SOI, R(2)] + img(0, 5) + [EOI, MASK] + t(" there") + [EOS, 999, -1]
    assert tok.decode(ids) == "Hi there"
    assert tok.decode(torch.tensor(t("é"))) == "é"
