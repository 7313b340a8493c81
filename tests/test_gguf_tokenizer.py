"""A GGUF's SentencePiece vocabulary read as llama.cpp reads it: the tokenizer the pipeline builds for it
gives llama.cpp's own ids (BOS/EOS, byte fallback, user-defined tokens, the space prefix included), on a tiny
SPM vocabulary learnt here and written as a vocabulary-only GGUF."""

from __future__ import annotations

import collections

import pytest

from tasks.gguf_tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, is_spm, spm_tokenizer
from tasks.model_io import TOKENIZER_PROBE
from tasks.quantize import llama_cpp

needs_llama_cpp = pytest.mark.skipif(not llama_cpp.available(), reason=f"llama.cpp is not built at {llama_cpp.home()} (make setup builds it)")

TRAIN = ("Robert Boulter is an English film , television and theatre actor . He had a guest starring role on the "
         "television series The Bill in 2000 . This was followed by a starring role in the play Herons written by "
         "Simon Stephens , which was performed in 2001 at the Royal Court Theatre .") * 3  # fmt: skip


def _learn_spm(text: str, merges: int) -> list[str]:
    """BPE pieces over SentencePiece's escaped text, most frequent merge first (a real SPM-BPE vocabulary's shape)."""
    words = collections.Counter(("▁" + w) for w in text.split(" "))
    split = {w: list(w) for w in words}
    pieces = sorted({c for w in words for c in w} - {"é"})  # é: not in the vocabulary, so it falls back to bytes
    for _ in range(merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for a, b in zip(split[w], split[w][1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        pieces.append(a + b)
        for w in split:
            s, out, i = split[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            split[w] = out
    return pieces


def _write_spm_gguf(path, add_space_prefix: bool) -> None:
    import gguf

    special = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)]
    byte = [(f"<0x{b:02X}>", BYTE) for b in range(256)]
    user = [("\n\n", USER_DEFINED), ("  ", USER_DEFINED)]
    learnt = _learn_spm(TRAIN + " " + TOKENIZER_PROBE.replace("é", "e"), 300)
    tokens = special + byte + user + [(p, NORMAL) for p in learnt]
    scores = [0.0] * (len(special) + len(byte) + len(user)) + [-float(i) for i in range(len(learnt))]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([t for t, _ in tokens])
    writer.add_token_scores(scores)
    writer.add_token_types([k for _, k in tokens])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


@needs_llama_cpp
@pytest.mark.parametrize("add_space_prefix", [False, True])
def test_the_spm_tokenizer_gives_llama_cpps_ids(tmp_path, add_space_prefix):
    from tasks.quantize.llama_cpp_runtime import llama_cpp_tokens

    path = tmp_path / "spm.gguf"
    _write_spm_gguf(path, add_space_prefix)
    assert is_spm(path)
    tokenizer = spm_tokenizer(path)
    tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = TOKENIZER_PROBE + "\n\n  Herons written  by Simon\n\n\nStephens ."
    for special in (False, True):
        theirs = llama_cpp_tokens(path, text, special=special)
        assert reloaded(text, add_special_tokens=special)["input_ids"] == theirs
    assert theirs[0] == 1, "llama.cpp puts BOS first"
    assert any(t in theirs for t in range(3, 3 + 256)), "é went through byte fallback"
    assert 259 in theirs and 260 in theirs, "the user-defined runs of newlines and spaces are split out whole"
    words = reloaded.convert_ids_to_tokens(theirs)
    assert len(theirs) < len(text) / 2 and "▁television" in words, "merged pieces, not characters"
    if not add_space_prefix:  # with the prefix, llama.cpp's own ids hold a space after each user-defined token
        assert reloaded.decode(theirs, skip_special_tokens=True) == text


@needs_llama_cpp
def test_a_tokenizer_that_does_not_reproduce_llama_cpps_stops_the_run_with_one_line(tmp_path):
    """check_tokenizer is the guard for whatever cannot be reproduced: here a converted checkpoint whose
    tokenizer adds a space prefix that the file's own metadata (and so llama.cpp) does not."""
    import shutil

    from tasks.errors import PipelineError
    from tasks.model_io import TOKENIZER_CHECKED, check_tokenizer
    from tasks.quantize.gguf_files import VOCAB_FILE

    _write_spm_gguf(tmp_path / "with-prefix.gguf", add_space_prefix=True)
    _write_spm_gguf(tmp_path / "file.gguf", add_space_prefix=False)
    target = tmp_path / "checkpoint"
    spm_tokenizer(tmp_path / "with-prefix.gguf").save_pretrained(target)
    shutil.copy(tmp_path / "file.gguf", target / VOCAB_FILE)
    with pytest.raises(PipelineError, match=r"file.gguf: its converted tokenizer does not reproduce llama.cpp's text") as err:
        check_tokenizer(tmp_path / "file.gguf", target)
    assert "\n" not in str(err.value) and not (target / TOKENIZER_CHECKED).exists()
    spm_tokenizer(tmp_path / "file.gguf").save_pretrained(target)
    check_tokenizer(tmp_path / "file.gguf", target)
    assert (target / TOKENIZER_CHECKED).is_file()
