"""The OpenAI-compatible transport: `OpenAIAgent` asks any Chat Completions endpoint (OpenAI,
vLLM, llama.cpp, a proxy) for the conversation's replies.

Network retries and backoff are the openai client's; this module maps what the endpoint says to
the project's errors with the fix in the message, reads a reply (refusals, cut-off and empty
answers become problems the model is told about), and checks the endpoint before the first run.
Guarantees: the API key is never put in a message, a record, an error or a repr.
"""

from __future__ import annotations

import os
import re
from json import JSONDecodeError
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where an endpoint is used: the SDK costs ~0.7 s of CPU, and every
    # command (`status`, `--help`) would pay it at start-up through the agent registry
    import openai
    from openai.types.chat import ChatCompletion

from ..errors import AgentError, UsageError
from . import prompts
from .base import AGENT_TIMEOUT_S, AgentOptions, EndpointError
from .conversation import MAX_ATTEMPTS, ChatAgent, Completion, ContextTooLong

CLIENT_MAX_RETRIES = 4  # the openai client's retries of 429/5xx/timeouts, with its own backoff
LOCAL_PLACEHOLDER_KEY = "not-needed"  # local servers ignore the key, the client wants one
CHECK_TIMEOUT_S = 60.0  # the check before the first run waits at most this per request
_UNKNOWN_MODEL = re.compile(
    r"model.{0,80}(not (be )?found|does not exist|doesn't exist|not exist|unknown|invalid|not "
    r"a valid|not supported|no such|not available|not served)|(unknown|invalid|no such) model",
    re.IGNORECASE,
)
_CONTEXT_TOO_LONG = re.compile(
    r"context[ _-]?(length|size|window)|maximum context|too many tokens|prompt is too long",
    re.IGNORECASE,
)


class OpenAIAgent(ChatAgent):
    """An LLM behind any OpenAI-compatible Chat Completions endpoint.

    Per proposal: up to `max_attempts` replies; a reply that is empty, refused, or whose edit
    does not apply or compile is answered with the precise reason and asked again. Token usage
    is summed over all attempts. When the endpoint reports the context is too long the prompt
    is rebuilt at the next PROMPT_LEVELS (history first, then the crash log) and sent again.
    """

    name = "openai"
    summary = "an LLM behind an OpenAI-compatible endpoint (--model, --base-url)"

    def __init__(
        self,
        *,
        model: str | None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = AGENT_TIMEOUT_S,
        max_retries: int = CLIENT_MAX_RETRIES,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        import openai

        if model is None and base_url is None:
            raise UsageError(
                "name the model with --model (e.g. --model gpt-4.1), or give --base-url"
            )
        self.model = model
        self.base_url = base_url
        self.max_attempts = max_attempts
        self.timeout = timeout
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=resolve_api_key(api_key, base_url),
            max_retries=max_retries,
            timeout=timeout,
        )

    @classmethod
    def create(cls, options: AgentOptions) -> OpenAIAgent:
        return cls(
            model=options.model,
            base_url=options.base_url,
            api_key=options.api_key,
            timeout=options.timeout,
        )

    def __repr__(self) -> str:  # the client holds the key: never show it
        return f"OpenAIAgent(model={self.model!r}, base_url={self.base_url!r})"

    def check(self) -> None:
        """One cheap request before the first run: the endpoint answers, serves the model and
        accepts the key. Raises EndpointError with the endpoint's own words and the fix.

        GET /models first (free); when the endpoint has no such route or does not list the
        model (llama.cpp serves any name, proxies list aliases), a one-token completion decides.
        A rate limit here is not a failure: the endpoint exists and the session waits it out.
        """
        import openai

        client = self._client.with_options(
            max_retries=1, timeout=min(CHECK_TIMEOUT_S, self.timeout)
        )
        listed: list[str] | None = None
        try:
            listed = [m.id for m in client.models.list()]
        except (openai.APIError, JSONDecodeError) as exc:
            self._check_failure(exc, route="/models")
        if self.model is None:
            if not listed:
                raise EndpointError(
                    f"No --model given and {self.base_url} lists no models; pass --model."
                )
            self.model = listed[0]
            return
        if listed and self.model in listed:
            return
        try:
            client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": "Reply with OK."}],
                max_tokens=1,
            )
        except openai.RateLimitError:
            return
        except (openai.APIError, JSONDecodeError) as exc:
            self._check_failure(exc, route="/chat/completions", listed=listed)

    def _check_failure(
        self, exc: Exception, *, route: str, listed: list[str] | None = None
    ) -> None:
        """Raise EndpointError for a failed check request, or return when the failure says
        nothing against the endpoint (a route it does not have, a parameter it refuses)."""
        import openai

        where = self.base_url or "the OpenAI API"
        if isinstance(exc, openai.APIConnectionError):
            reason = (
                str(exc.__cause__ or exc)
                if not isinstance(exc, openai.APITimeoutError)
                else (f"no answer within {CHECK_TIMEOUT_S:g}s")
            )
            raise EndpointError(
                f"Cannot reach {where} ({' '.join(reason.split())[:200]}): check --base-url (it "
                "usually ends in /v1, e.g. http://localhost:8000/v1) and that the server is "
                "running."
            ) from None
        if isinstance(exc, JSONDecodeError) or not isinstance(exc, openai.APIStatusError):
            if route == "/models":
                return  # judged by the completion that follows
            raise EndpointError(
                f"{where} answered {route} with something that is not the OpenAI API "
                f"({' '.join(str(exc).split())[:200]}): check --base-url (it usually ends in /v1)."
            ) from None
        status, said = exc.status_code, _endpoint_words(exc)
        if status in (401, 403):
            raise EndpointError(
                f"{where} rejected the API key (HTTP {status}: {said}): set OPENAI_API_KEY or "
                "AUTORESEARCH_API_KEY to a valid key for this endpoint."
            ) from None
        if route == "/models":
            return  # no /models route (or a broken one): the completion decides
        model_unknown = status == 404 or (status in (400, 422) and _UNKNOWN_MODEL.search(said))
        if model_unknown:
            offered = f" (it lists: {', '.join(listed[:10])})" if listed else ""
            raise EndpointError(
                f"{where} does not serve model {self.model!r} (HTTP {status}: {said}): pass a "
                f"model it serves with --model{offered}, or check --base-url."
            ) from None
        if status in (400, 413, 422):
            return  # it understood the model and the key, and refused the probe's parameters
        raise EndpointError(
            f"{where} failed the first request (HTTP {status}: {said}) even after a retry: "
            "check that the server is healthy, then start again."
        ) from None

    def resolve_model(self) -> str:
        """The configured model, or the first one a local server lists."""
        import openai

        if self.model is None:
            try:
                models = [m.id for m in self._client.models.list()]
            except openai.APIError as exc:
                raise AgentError(
                    f"No --model given and {self.base_url} did not list its models "
                    f"({_describe(exc)}); pass --model."
                ) from None
            if not models:
                raise AgentError(f"No --model given and {self.base_url} lists none; pass --model.")
            self.model = models[0]
        return self.model

    def complete(self, model: str, messages: list[dict]) -> Completion:
        """One request; the client retries 429/5xx/timeouts itself. Maps failures to AgentError."""
        completion = self._request(model, messages)
        text, problem = _reply_text(completion)
        usage = completion.usage
        return Completion(
            text,
            problem,
            (usage.prompt_tokens or 0) if usage else 0,
            (usage.completion_tokens or 0) if usage else 0,
        )

    def _request(self, model: str, messages: list[dict]) -> ChatCompletion:
        import openai

        where = self.base_url or "the OpenAI API"
        try:
            return self._client.chat.completions.create(model=model, messages=messages)
        except openai.APIStatusError as exc:
            if exc.status_code == 413 or (
                exc.status_code == 400
                and (exc.code == "context_length_exceeded" or _CONTEXT_TOO_LONG.search(exc.message))
            ):
                raise ContextTooLong from None
            if exc.status_code in (401, 403):
                raise AgentError(
                    f"{where} rejected the API key (HTTP {exc.status_code}) - set OPENAI_API_KEY "
                    "or AUTORESEARCH_API_KEY to a valid key."
                ) from None
            if exc.status_code == 404:
                raise AgentError(
                    f"{where} does not know model {model!r} or the URL (HTTP 404): check --model "
                    "and --base-url (it usually ends in /v1)."
                ) from None
            if exc.status_code == 429 or exc.status_code >= 500:
                raise AgentError(
                    f"{where} still answered HTTP {exc.status_code} after "
                    f"{self._client.max_retries} retries: {_describe(exc)}. Wait and try again."
                ) from None
            raise AgentError(f"{where} refused the request: {_describe(exc)}") from None
        except openai.APITimeoutError:
            raise AgentError(
                f"{where} did not answer within {self._client.timeout}s "
                f"({self._client.max_retries} retries); is it overloaded? Wait, or raise --agent-timeout."
            ) from None
        except openai.APIConnectionError:
            raise AgentError(
                f"Could not connect to {where} ({self._client.max_retries} retries): is the "
                "server running and --base-url right?"
            ) from None
        except openai.APIError as exc:
            raise AgentError(f"{where} sent an unusable response: {_describe(exc)}") from None
        except JSONDecodeError:
            raise AgentError(
                f"{where} answered with a body that is not JSON; is --base-url right?"
            ) from None


def resolve_api_key(api_key: str | None, base_url: str | None) -> str:
    """The key to send: the argument, else AUTORESEARCH_API_KEY, else OPENAI_API_KEY; a
    placeholder for a custom base_url (local servers need none)."""
    key = api_key or os.environ.get("AUTORESEARCH_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if base_url:
        return LOCAL_PLACEHOLDER_KEY
    raise AgentError(
        "No API key found - set OPENAI_API_KEY (or AUTORESEARCH_API_KEY), or pass --base-url "
        "for a local OpenAI-compatible server that needs none."
    )


def _reply_text(completion: ChatCompletion) -> tuple[str, str]:
    """(text, problem): problem is "" for a reply worth parsing, else what to tell the model."""
    if not completion.choices:
        return "", prompts.NO_CHOICES
    choice = completion.choices[0]
    message = choice.message
    text = message.content or ""
    if message.refusal:
        return text, prompts.REFUSED.format(refusal=message.refusal)
    # Checked before the text is parsed: a cut-off reply may look whole (it may stop between
    # two blocks, or a whole file before its end), so no part of it is ever applied.
    if choice.finish_reason in _CUT_OFF:
        where = "while reasoning, before any answer" if not text.strip() else "before its end"
        return text, prompts.CUT_OFF.format(where=where)
    if choice.finish_reason == "content_filter":
        return text, prompts.FILTERED
    if not text.strip():
        # Some servers return the reasoning in `reasoning_content`: it is never the answer.
        if (message.model_extra or {}).get("reasoning_content"):
            return text, prompts.ONLY_REASONING
        return text, prompts.EMPTY
    return text, ""


# finish_reason values meaning the output limit was hit (OpenAI and vLLM say "length")
_CUT_OFF = ("length", "max_tokens")


def _endpoint_words(exc: openai.APIStatusError) -> str:
    """The endpoint's own error message (the body's `message`), else the client's summary."""
    body = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return " ".join(body["message"].split())[:300]
    return _describe(exc)


def _describe(exc: openai.APIError) -> str:
    return " ".join(str(exc.message).split())[:300]
