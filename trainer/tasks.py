"""Built-in generated tasks (``data.task``): a training set, a disjoint held-out set, and a score.

A task makes chat ``messages`` rows, ``{"messages": [user, assistant], "answer": "..."}``, so they go
through the same chat-template path as a user's own messages dataset. Its :meth:`Task.score` judges a
model's generated completion against the row's answer, which gives the run a task accuracy next to
the held-out loss.

Train and eval sets come from different seeds and are deduplicated against each other: no eval
question appears in the training set.

Adding a task is one class: subclass :class:`Task`, set ``name``, implement ``capacity``, ``sample``
and (when "starts with the answer" is not the right judgement) ``score``, and decorate it with
:func:`register`. ``DataConfig.task`` lists the names the config accepts.
"""

from __future__ import annotations

import calendar
import random
import re
from typing import ClassVar

from .errors import DataError

TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available to :func:`get_task` under ``cls.name``."""
    TASKS[cls.name] = cls
    return cls


class Task:
    """A generated task. Subclasses implement :meth:`sample` and :attr:`capacity`."""

    name: ClassVar[str] = ""

    @property
    def capacity(self) -> int:
        """How many distinct questions the task can make."""
        raise NotImplementedError

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """One random (question, answer) pair drawn with ``rng``."""
        raise NotImplementedError

    def row(self, question: str, answer: str) -> dict:
        """A chat ``messages`` row with the answer alongside for scoring."""
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ],
            "answer": answer,
        }

    def generate(
        self, n: int, seed: int, exclude: frozenset[str] | set[str] = frozenset(), field: str = "data.task"
    ) -> list[dict]:
        """``n`` distinct rows, the same for the same ``(n, seed, exclude)``.

        Args:
            field: the config field that asked for ``n`` rows, for the error.
            n: how many rows.
            seed: the random seed.
            exclude: questions that must not appear (another split's questions).

        Returns:
            ``n`` rows ``{"messages": [user, assistant], "answer": str}`` with distinct questions.

        Raises:
            DataError: ``n`` more than the task's distinct questions left after ``exclude``.
        """
        available = self.capacity - len(exclude)
        if n > available:
            left = f" after the {len(exclude)} held out" if exclude else ""
            raise DataError(
                f"{field}: the {self.name} task has only {available} distinct questions{left}, asked for {n}"
            )
        rng = random.Random(f"{self.name}:{seed}")
        seen = set(exclude)
        rows = []
        while len(rows) < n:
            question, answer = self.sample(rng)
            if question in seen:
                continue
            seen.add(question)
            rows.append(self.row(question, answer))
        return rows

    def split(self, num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
        """Disjoint training and held-out rows.

        The held-out rows come from their own seed and are drawn first; the training rows then
        exclude every held-out question.

        Args:
            num_train: training rows.
            num_eval: held-out rows.
            seed: ``data.seed``.

        Returns:
            (train_rows, eval_rows).

        Raises:
            DataError: more rows asked for than the task has distinct questions.
        """
        eval_rows = self.generate(num_eval, seed=2 * seed + 1, field="data.num_eval")
        held_out = {question_of(r) for r in eval_rows}
        train_rows = self.generate(num_train, seed=2 * seed, exclude=held_out, field="data.num_train")
        return train_rows, eval_rows

    def score(self, row: dict, completion: str) -> bool:
        """Whether a generated completion answers the row.

        Correct iff the completion, stripped of surrounding whitespace, starts with the answer and
        the answer is not merely the start of a longer word or number (``"2024-03-051"`` is wrong,
        ``"2024-03-05."`` and ``"2024-03-05 is the date"`` are right).

        Args:
            row: a row made by :meth:`generate` (has ``"answer"``).
            completion: the decoded generated text, special tokens skipped.

        Returns:
            True when correct.
        """
        answer = row["answer"]
        # not followed by more of a token: a letter or digit, or a separator and a digit (2024-03-05-01)
        return re.match(re.escape(answer) + r"(?![0-9A-Za-z]|[-./:][0-9])", completion.strip()) is not None


def question_of(row: dict) -> str:
    """The user question of a task row (its first user message)."""
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


@register
class DatesTask(Task):
    """Rewrite a spelled-out date in ISO form.

    "Write the date March 5, 2024 in YYYY-MM-DD format." -> "2024-03-05". SmolLM2-135M-Instruct scores
    0% before fine-tuning (it echoes the date back), so the improvement is measurable.
    """

    name = "dates"
    first_year = 1900
    last_year = 2099

    @property
    def capacity(self) -> int:
        """Every valid date between ``first_year`` and ``last_year``."""
        return sum(366 if calendar.isleap(y) else 365 for y in range(self.first_year, self.last_year + 1))

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """A uniformly random year and month, then a valid day of that month."""
        year = rng.randint(self.first_year, self.last_year)
        month = rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        question = f"Write the date {calendar.month_name[month]} {day}, {year} in YYYY-MM-DD format."
        return question, f"{year:04d}-{month:02d}-{day:02d}"


def get_task(name: str) -> Task:
    """The built-in task called ``name``.

    Args:
        name: a registered task name (``data.task``), e.g. ``"dates"``.

    Returns:
        A task instance.

    Raises:
        DataError: no task has that name.
    """
    if name not in TASKS:
        raise DataError(f"data.task: unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    return TASKS[name]()
