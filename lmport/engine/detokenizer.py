"""Incremental detokenization with stop strings.

Text is produced with the prefix/read-offset window that vLLM uses: decode a few tokens of context before and after
the new token and emit the difference, so each token costs two short `decode` calls whatever the output length,
and a character split over several byte-fallback tokens is emitted only once it is complete (never U+FFFD for a
partial character).

Stop strings are searched across token boundaries. While a stop string may still be completing, the tail of the text
that could be its start is held back from `get_next_output_text`, so streamed text never has to be taken back.
"""

from __future__ import annotations

from typing import Any

from lmport.engine.sampling_params import SamplingParams

CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token (word-boundary spaces depend on them)
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, params: SamplingParams, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        # Without spaces between special tokens, an added token's text is taken as is instead of via the decoder.
        self.raw_added: dict[int, str] | None = None
        if not params.skip_special_tokens and not params.spaces_between_special_tokens:
            self.raw_added = {i: tok.content for i, tok in tokenizer.added_tokens_decoder.items()}
        self.stop: list[str] = params.stop or []
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.ids: list[int] = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is context already turned into text
        self.read_offset = len(self.ids)
        self.output_text = ""
        self.num_output_tokens = 0
        self.stop_string: str | None = None
        self._stop_check_from = 0  # text before this offset came within min_tokens: no stop string may end there
        self._sent = 0  # characters already delivered in delta mode

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Add sampled tokens; returns the stop string when one now appears in the text (the text is cut there).

        stop_terminated: the last token ends the sequence (EOS or a stop token id); its text is then kept only
        with include_stop_str_in_output, as in vLLM."""
        if self.stop_string is not None:
            return None
        searched = len(self.output_text)
        for i, token_id in enumerate(new_token_ids):
            self.num_output_tokens += 1
            if stop_terminated and i == len(new_token_ids) - 1 and not self.include_stop:
                break
            self.output_text += self._decode_next(token_id)
            if self.num_output_tokens <= self.min_tokens:
                self._stop_check_from = len(self.output_text)
        if self.stop and len(self.output_text) > searched:
            return self._find_stop(max(searched, self._stop_check_from))
        return None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The whole text so far (or only the part not yet returned, when delta), minus a held-back tail that might
        still become a stop string; everything once finished."""
        if finished and self.stop_string is None:
            self.output_text += self._flush()
        end = len(self.output_text) - (0 if finished else self._hold_back())
        if not delta:
            return self.output_text[:end]
        if end <= self._sent:
            return ""
        start, self._sent = self._sent, end
        return self.output_text[start:end]

    # --- decoding ---

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _decode_next(self, token_id: int) -> str:
        if self.raw_added is not None and token_id in self.raw_added:
            text = self._flush() + self.raw_added[token_id]
            self.ids.append(token_id)
            self.prefix_offset = self.read_offset = len(self.ids)
            return text
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""  # nothing yet, or a character whose remaining bytes are still to come
        self._advance()
        return new_text[len(prefix_text):]

    def _advance(self) -> None:
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.prefix_offset > 4 * CONTEXT_TOKENS:  # keep the window short
            del self.ids[:self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0

    def _flush(self) -> str:
        """Text of tokens still held for an incomplete character (a truly invalid byte sequence shows as U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self._advance()
        return new_text[len(prefix_text):]

    # --- stop strings ---

    def _find_stop(self, new_from: int) -> str | None:
        """Earliest stop string ending after new_from (list order breaks ties); cuts the text at it."""
        text = self.output_text
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = text.find(stop, max(0, new_from - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.output_text = text[:index + len(stop)] if self.include_stop else text[:index]
        self.stop_string = stop
        return stop

    def _hold_back(self) -> int:
        """Length of the longest text tail that is a proper prefix of a stop string (0 when the stop string would
        be kept in the output anyway: then nothing emitted can ever be taken back)."""
        if not self.stop or self.include_stop or self.stop_string is not None:
            return 0
        text = self.output_text
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
