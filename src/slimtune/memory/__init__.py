"""The memory maths: estimate (no torch), measure (torch), and plan what fits a GPU. See docs/memory.md."""
