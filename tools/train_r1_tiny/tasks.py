"""The synthetic task r1-tiny learns: integer arithmetic with the working shown.

Each problem is a user request in one of several phrasings; the reply thinks column by column
(digits, carries, borrows) inside <think>...</think> and then states the result. Everything is a
pure function of a `random.Random`, so a seed fixes the whole data stream.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

COLUMN_NAMES = ["ones", "tens", "hundreds", "thousands"]
KINDS = ["add", "sub", "mul"]

PHRASINGS = {
    "add": [
        "What is {a} + {b}?",
        "{a} + {b}",
        "{a}+{b}=?",
        "Calculate {a} plus {b}.",
        "What is the sum of {a} and {b}?",
        "Add {a} and {b}.",
        "what's {a} plus {b}",
    ],
    "sub": [
        "What is {a} - {b}?",
        "{a} - {b}",
        "{a}-{b}=?",
        "Calculate {a} minus {b}.",
        "Subtract {b} from {a}.",
        "What is {a} minus {b}?",
        "what's {a} minus {b}",
    ],
    "mul": [
        "What is {a} * {b}?",
        "{a} x {b}",
        "{a}*{b}=?",
        "Calculate {a} times {b}.",
        "What is the product of {a} and {b}?",
        "Multiply {a} by {b}.",
        "what's {a} times {b}",
    ],
}

SYMBOL = {"add": "+", "sub": "-", "mul": "×"}

GREETINGS = [
    "Hello",
    "Hi!",
    "hello there",
    "Hey",
    "Who are you?",
    "What can you do?",
    "help",
]
GREETING_THINKING = "This is not an arithmetic problem. I can only add, subtract and multiply whole numbers."
GREETING_ANSWER = (
    "Hello! I am r1-tiny, a tiny reasoning model. Ask me to add, subtract or multiply whole numbers, "
    "for example: What is 347 + 589?"
)


@dataclass(frozen=True)
class Problem:
    kind: str
    a: int
    b: int
    phrasing: int

    @property
    def prompt(self) -> str:
        return PHRASINGS[self.kind][self.phrasing].format(a=self.a, b=self.b)

    @property
    def answer(self) -> int:
        return {"add": self.a + self.b, "sub": self.a - self.b, "mul": self.a * self.b}[self.kind]

    @property
    def key(self) -> tuple[str, int, int]:
        """Problems that differ only in phrasing are the same problem (held-out sets exclude them all)."""
        return (self.kind, self.a, self.b)


def random_operand(rng: random.Random, max_digits: int) -> int:
    """Number of digits uniform in 1..max_digits, then a uniform value of that length."""
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def random_problem(rng: random.Random) -> Problem:
    kind = rng.choice(KINDS)
    if kind == "mul":
        a, b = random_operand(rng, 3), rng.randint(0, 9)
        if rng.random() < 0.3:
            a, b = b, a
    else:
        a, b = random_operand(rng, 3), random_operand(rng, 3)
    return Problem(kind, a, b, rng.randrange(len(PHRASINGS[kind])))


def digits_low_first(n: int, width: int) -> list[int]:
    return [(n // 10**i) % 10 for i in range(width)]


def result_line(columns: list[tuple[str, int]], value: int) -> str:
    listed = ", ".join(f"{name} {digit}" for name, digit in reversed(columns))
    return f"Digits: {listed}. Result: {value}."


def carry_columns(columns: list[tuple[str, int]], value: int) -> list[str]:
    """One line per column for addition and multiplication: `(expression, column total)` pairs,
    low column first, each written as `<name>: <expression> + <carry in> = ..., carry <out>`."""
    lines, written, carry = [], [], 0
    for i, (expression, column_total) in enumerate(columns):
        total = column_total + carry
        digit, carry_out = total % 10, total // 10
        lines.append(f"{COLUMN_NAMES[i]}: {expression} + {carry} = {total}, write {digit}, carry {carry_out}")
        written.append((COLUMN_NAMES[i], digit))
        carry = carry_out
    if carry:
        width = len(columns)
        lines.append(f"{COLUMN_NAMES[width]}: carry {carry}, write {carry}")
        written.append((COLUMN_NAMES[width], carry))
    return lines + [result_line(written, value)]


def add_working(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    da, db = digits_low_first(a, width), digits_low_first(b, width)
    return carry_columns([(f"{x} + {y}", x + y) for x, y in zip(da, db)], a + b)


def sub_working(big: int, small: int) -> tuple[list[str], int]:
    width = len(str(big))
    dx, dy = digits_low_first(big, width), digits_low_first(small, width)
    lines, written, borrow = [], [], 0
    for i in range(width):
        x, y = dx[i], dy[i]
        head = f"{COLUMN_NAMES[i]}: {x} - {y} - {borrow}"
        if x - y - borrow >= 0:
            digit, borrow_out = x - y - borrow, 0
            lines.append(f"{head} = {digit}, write {digit}, borrow 0")
        else:
            digit, borrow_out = 10 + x - y - borrow, 1
            lines.append(f"{head} is negative, so 1{x} - {y} - {borrow} = {digit}, write {digit}, borrow 1")
        written.append((COLUMN_NAMES[i], digit))
        borrow = borrow_out
    return lines + [result_line(written, big - small)], big - small


def mul_working(a: int, m: int) -> list[str]:
    return carry_columns([(f"{x} × {m}", x * m) for x in digits_low_first(a, len(str(a)))], a * m)


def thinking(p: Problem) -> str:
    """The working inside <think>: restate, then one line per column, then read the digits off."""
    sym = SYMBOL[p.kind]
    head = f"We need {p.a} {sym} {p.b}."
    if p.kind == "add":
        return "\n".join([head + " Add column by column from the right."] + add_working(p.a, p.b))
    if p.kind == "sub":
        if p.a >= p.b:
            lines, _ = sub_working(p.a, p.b)
            return "\n".join([head + f" {p.a} is not smaller than {p.b}, so subtract column by column."] + lines)
        lines, value = sub_working(p.b, p.a)
        intro = f"{head} {p.a} is smaller than {p.b}, so compute {p.b} - {p.a} and make it negative."
        return "\n".join([intro] + lines + [f"With the minus sign: {-value}."])
    # multiplication: the multi-digit number column by column times the single digit
    big, digit = (p.a, p.b) if p.b < 10 else (p.b, p.a)
    return "\n".join([head + f" Multiply {big} by {digit} column by column from the right."] + mul_working(big, digit))


def answer_text(p: Problem) -> str:
    return f"{p.a} {SYMBOL[p.kind]} {p.b} = {p.answer}"


def reply(p: Problem) -> str:
    """The assistant turn after the generation prompt (which already opened <think>)."""
    return f"{thinking(p)}\n</think>\n\n{answer_text(p)}"


def greeting_reply() -> str:
    return f"{GREETING_THINKING}\n</think>\n\n{GREETING_ANSWER}"


ANSWER_RE = re.compile(r"=\s*(-?\d+)\s*$")


def parse_answer(content: str) -> int | None:
    """The integer after the last `=` of the answer (outside the thinking), or None."""
    match = ANSWER_RE.search(content.strip())
    return int(match.group(1)) if match else None


def held_out_problems(seed: int, count: int) -> list[Problem]:
    """A fixed evaluation set, balanced over the kinds, distinct problems."""
    rng = random.Random(seed)
    seen, out = set(), []
    per_kind = {k: 0 for k in KINDS}
    while len(out) < count:
        p = random_problem(rng)
        quota = count // len(KINDS) + (1 if KINDS.index(p.kind) < count % len(KINDS) else 0)
        if p.key in seen or per_kind[p.kind] >= quota:
            continue
        seen.add(p.key)
        per_kind[p.kind] += 1
        out.append(p)
    return out


if __name__ == "__main__":
    rng = random.Random(0)
    for _ in range(6):
        p = random_problem(rng)
        print(repr(p.prompt))
        print(reply(p))
        print("----")
