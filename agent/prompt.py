"""The prompt text a question becomes for a checkpoint.

Text formats (base models: `default`, R1-Searcher's `User:{q}\\nAssistant: <think>`) use the
format's template as is. Chat formats (Search-R1's instruct checkpoints) send that same filled
template as the one user message through the checkpoint's own chat template, as the upstream
inference scripts do (`apply_chat_template([{"role": "user", ...}], add_generation_prompt=True)`).
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.tags import TagFormat
from agent.tokenizer import Tokenizer

Turn = tuple[str, str]  # (role: "user" | "assistant", text); assistant text = its answer only


def build_prompt(
    fmt: TagFormat,
    tokenizer: Tokenizer,
    question: str,
    history: Sequence[Turn] = (),
    system: str | None = None,
) -> str:
    """The prompt for `question`, after the earlier turns of a conversation and a system text.

    Chat formats put them in the chat template as messages. Text formats have no roles, so they
    get them as plain lines before the template: `system`, then `User: …` / `Assistant: …`.
    """
    text = fmt.prompt(question)
    if not fmt.chat:
        lines = ([system] if system else []) + [
            f"{'User' if role == 'user' else 'Assistant'}: {said}" for role, said in history
        ]
        return "\n".join([*lines, text]) if lines else text
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tag format {fmt.name!r} is a chat format, but the checkpoint has no chat template "
            "(no chat_template in tokenizer_config.json, no chat_template.jinja)"
        )
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": role, "content": said} for role, said in history]
    messages.append({"role": "user", "content": text})
    return tokenizer.render_chat(messages, add_generation_prompt=True)
