"""The prompt length check owns its tokenizers (nitrofusion/tokens.py): it stays right while the engine thread
tokenizes with padding and truncation at the same time."""

import threading

import pytest

from nitrofusion.errors import InvalidRequest
from nitrofusion.generation import GenerationRequest
from nitrofusion.pipeline import Pipeline
from nitrofusion.tokens import TokenCounter

LONG = "a red circle " * 40  # well past the 77 tokens the text encoders read


def test_count_is_the_longest_untruncated_tokenization(pipelines):
    model = pipelines["sdxl"].model
    counter = TokenCounter(model.tokenizers)
    assert counter.count(LONG) == max(len(t(LONG).input_ids) for t in model.tokenizers) > 77
    assert counter.count("a dog") == 4  # start, two words, end


def test_counts_stay_right_while_the_engine_thread_pads_and_truncates(pipelines):
    """Several threads check a too-long prompt through Pipeline.validate while another thread runs the model's
    own tokenizers as the backends' encode_text does (padding and truncation to 77). Sharing one tokenizer,
    the check now and then saw 77 tokens and let the prompt through, and the encode now and then saw no
    padding and raised; with the counter's own copies neither happens."""
    shared = pipelines["sdxl"]
    pipe = Pipeline(shared.model, shared.backend, shared.sampler)  # a fresh TokenCounter, same tokenizers
    expected = pipe.tokens.count(LONG)
    request = GenerationRequest(LONG, 1, 0, 32, 32)
    encodes_left = threading.Semaphore(0)
    done = threading.Event()
    wrong: list[str] = []
    encoder_errors: list[BaseException] = []

    def encoder() -> None:
        try:
            for i in range(1500):
                for tok in pipe.model.tokenizers:
                    ids = tok([f"a dog {i}", LONG], padding="max_length", max_length=tok.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
                    assert tuple(ids.shape) == (2, tok.model_max_length)
                encodes_left.release()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            encoder_errors.append(e)
        finally:
            done.set()

    def checker() -> None:
        while not done.is_set():
            try:
                pipe.validate(request)
                wrong.append("a too-long prompt passed the check")
            except InvalidRequest as e:
                if f"{expected} tokens" not in e.reason:
                    wrong.append(e.reason)

    threads = [threading.Thread(target=encoder)] + [threading.Thread(target=checker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not encoder_errors, encoder_errors[0]
    assert not wrong, f"{len(wrong)} wrong checks, e.g. {wrong[0]}"


def test_a_model_without_tokenizers_is_refused():
    with pytest.raises(ValueError, match="tokenizer"):
        TokenCounter([])
