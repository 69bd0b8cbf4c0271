"""Everyday facts the demo's tiny model learns in its "general" pre-training.

Plain tables, written for this demo: a model that has seen each fact many times in several
phrasings becomes confident about them, which is what EAFT's entropy signal needs to see.
"""

from __future__ import annotations

CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Greece", "Athens"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"),
    ("Hungary", "Budapest"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Thailand", "Bangkok"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Russia", "Moscow"),
    ("Turkey", "Ankara"),
    ("Iran", "Tehran"),
    ("India", "New Delhi"),
    ("Australia", "Canberra"),
    ("Argentina", "Buenos Aires"),
)

ANIMAL_SOUNDS: tuple[tuple[str, str], ...] = (
    ("dog", "barks"),
    ("cat", "meows"),
    ("cow", "moos"),
    ("duck", "quacks"),
    ("lion", "roars"),
    ("horse", "neighs"),
    ("sheep", "bleats"),
    ("owl", "hoots"),
    ("snake", "hisses"),
    ("bee", "buzzes"),
    ("frog", "croaks"),
    ("pig", "oinks"),
    ("wolf", "howls"),
    ("mouse", "squeaks"),
)

COLOURS: tuple[tuple[str, str], ...] = (
    ("the sky on a clear day", "blue"),
    ("fresh grass", "green"),
    ("snow", "white"),
    ("coal", "black"),
    ("a ripe banana", "yellow"),
    ("a ripe tomato", "red"),
    ("an orange", "orange"),
    ("a lemon", "yellow"),
    ("milk", "white"),
    ("chocolate", "brown"),
    ("a strawberry", "red"),
    ("an emerald", "green"),
    ("the sea", "blue"),
    ("a raven", "black"),
    ("a violet", "purple"),
    ("a flamingo", "pink"),
)

OPPOSITES: tuple[tuple[str, str], ...] = (
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("open", "closed"),
    ("early", "late"),
    ("happy", "sad"),
    ("light", "dark"),
    ("full", "empty"),
    ("young", "old"),
    ("wet", "dry"),
    ("hard", "soft"),
    ("loud", "quiet"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("thick", "thin"),
    ("near", "far"),
    ("high", "low"),
    ("long", "short"),
    ("clean", "dirty"),
)

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

# Everyday statements without a question form: background text for the language model.
EVERYDAY: tuple[str, ...] = (
    "Water freezes when it is very cold.",
    "The sun rises in the east and sets in the west.",
    "Plants need light and water to grow.",
    "A week has seven days.",
    "A year has twelve months.",
    "Birds build nests in the trees.",
    "Fish live in rivers, lakes and the sea.",
    "People sleep at night and work during the day.",
    "Bread is made from flour, water and yeast.",
    "Rain falls from the clouds.",
    "The moon shines at night.",
    "Children go to school to learn.",
    "A clock tells the time.",
    "Trains run on rails.",
    "Ships sail on the sea.",
    "Bees make honey from flowers.",
    "Ice melts when it gets warm.",
    "A library is full of books.",
    "Doctors help people who are ill.",
    "Farmers grow food in their fields.",
)
