"""A small, realistic schema with fake PII for the demo, the tests and the benchmarks.

Values are generated deterministically from a seed, are fake, and are valid enough for
the detectors to recognise: SSNs in the issued ranges, card numbers that pass Luhn,
IBANs with correct mod-97 check digits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia",
         "Leslie", "Margaret", "Niklaus", "Shafi", "Tim", "Vint", "Whitfield"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson",
        "Perlman", "Lamport", "Hamilton", "Wirth", "Goldwasser", "Berners-Lee", "Cerf",
        "Diffie"]
CITIES = ["Springfield", "Riverton", "Lakeside", "Fairview", "Georgetown", "Salem"]


def luhn_complete(prefix: str) -> str:
    """``prefix`` plus the check digit that makes it pass the Luhn test."""
    total = 0
    for index, char in enumerate(reversed(prefix)):
        digit = int(char)
        if index % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return prefix + str((10 - total % 10) % 10)


def iban_for(country: str, bban: str) -> str:
    """An IBAN with correct check digits (ISO 13616 mod-97)."""
    rearranged = bban + country + "00"
    numeric = "".join(str(int(c, 36)) for c in rearranged)
    check = 98 - int(numeric) % 97
    return f"{country}{check:02d}{bban}"


@dataclass(frozen=True)
class Customer:
    id: int
    full_name: str
    email: str
    ssn: str
    card_number: str
    phone: str
    city: str
    note: str


@dataclass(frozen=True)
class Account:
    id: int
    customer_id: int
    iban: str
    balance_cents: int


def customers(count: int = 200, seed: int = 7) -> list[Customer]:
    rng = random.Random(seed)
    out = []
    for i in range(1, count + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        area = rng.choice([n for n in range(100, 899) if n != 666])
        ssn = f"{area:03d}-{rng.randint(10, 99):02d}-{rng.randint(1000, 9999):04d}"
        card = luhn_complete("4" + "".join(str(rng.randint(0, 9)) for _ in range(14)))
        email = f"{first.lower()}.{last.lower().replace('-', '')}{i}@example.com"
        phone = f"+1-555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
        note = rng.choice([
            f"Called about card {card}; verified SSN {ssn}.",
            f"Prefers email {email}; do not call {phone}.",
            "Asked to close the savings account.",
            f"Identity check done with SSN {ssn}.",
            "Requested a paper statement.",
        ])
        out.append(Customer(i, f"{first} {last}", email, ssn, card, phone, rng.choice(CITIES),
                            note))
    return out


def accounts(people: list[Customer], seed: int = 11) -> list[Account]:
    rng = random.Random(seed)
    out = []
    for index, person in enumerate(people, start=1):
        bban = f"{rng.randint(10000000, 99999999)}{rng.randint(1000000000, 9999999999)}"
        out.append(Account(index, person.id, iban_for("DE", bban),
                           rng.randint(-50_000, 5_000_000)))
    return out


SCHEMA = """
DROP TABLE IF EXISTS public.orders, public.accounts, public.customers, public.products CASCADE;
CREATE TABLE public.customers (
    id integer PRIMARY KEY,
    full_name text NOT NULL,
    email text NOT NULL,
    ssn text NOT NULL,
    card_number text NOT NULL,
    phone text,
    city text,
    note text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE public.accounts (
    id integer PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES public.customers(id),
    iban text NOT NULL,
    balance_cents bigint NOT NULL
);
CREATE TABLE public.products (
    id integer PRIMARY KEY,
    name text NOT NULL,
    price_cents integer NOT NULL
);
CREATE TABLE public.orders (
    id serial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES public.customers(id),
    product_id integer NOT NULL REFERENCES public.products(id),
    quantity integer NOT NULL,
    status text NOT NULL DEFAULT 'new',
    placed_at timestamptz NOT NULL DEFAULT now()
);
"""

PRODUCTS = [(1, "Checking plan", 0), (2, "Savings plan", 0), (3, "Premium card", 9900),
            (4, "Travel insurance", 4900), (5, "Safe deposit box", 12000)]


async def seed(conn: object, count: int = 200) -> tuple[list[Customer], list[Account]]:
    """Create and fill the demo schema through an asyncpg connection."""
    people = customers(count)
    accts = accounts(people)
    await conn.execute(SCHEMA)  # type: ignore[attr-defined]
    await conn.copy_records_to_table(  # type: ignore[attr-defined]
        "customers", records=[(c.id, c.full_name, c.email, c.ssn, c.card_number, c.phone,
                               c.city, c.note) for c in people],
        columns=["id", "full_name", "email", "ssn", "card_number", "phone", "city", "note"])
    await conn.copy_records_to_table(  # type: ignore[attr-defined]
        "accounts", records=[(a.id, a.customer_id, a.iban, a.balance_cents) for a in accts],
        columns=["id", "customer_id", "iban", "balance_cents"])
    await conn.executemany(  # type: ignore[attr-defined]
        "INSERT INTO products VALUES ($1, $2, $3)", PRODUCTS)
    rng = random.Random(3)
    await conn.executemany(  # type: ignore[attr-defined]
        "INSERT INTO orders (customer_id, product_id, quantity, status) VALUES ($1,$2,$3,$4)",
        [(rng.randint(1, count), rng.randint(1, 5), rng.randint(1, 3),
          rng.choice(["new", "paid", "shipped"])) for _ in range(count * 3)])
    await conn.execute("ANALYZE")  # type: ignore[attr-defined]
    return people, accts
