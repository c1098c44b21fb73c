"""Exim's balanced binary trees, as far as the spool can see them.

Exim keeps the non-recipients and the ACL variables in AVL trees (Knuth's
algorithm, names compared as bytes) and writes both to the -H file by a
pre-order walk: the node, then its left subtree, then its right subtree.
The order of ``-aclc``/``-aclm`` lines and the shape written for the
non-recipients therefore depend on the order the names were inserted in,
and :func:`spool_order` reproduces that.

Exim rebuilds the ACL variable trees by inserting names in file order when
it reads a -H file, and the non-recipients tree keeps the shape recorded
in the file (with the balance factors recomputed from subtree depths), so
a tree read back from a -H file can be extended with :func:`tree_insert`
exactly as Exim would.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_LEFT = 1   # left subtree is deeper
_RIGHT = 2  # right subtree is deeper


@dataclass(eq=False)
class TreeNode:
    """One node: a name, its subtrees and an AVL balance factor."""

    name: str
    left: TreeNode | None = None
    right: TreeNode | None = None
    balance: int = 0


def _key(name: str) -> bytes:
    # Exim compares with strcmp(): unsigned bytes.  Names are Latin-1 text.
    return name.encode("latin-1")


def _cmp(a: str, b: str) -> int:
    ka, kb = _key(a), _key(b)
    return (ka > kb) - (ka < kb)


def tree_insert(root: TreeNode | None, name: str) -> tuple[TreeNode, bool]:
    """Insert *name* into the tree at *root*; return the (possibly new)
    root and whether the name was added (False for a duplicate)."""
    node = TreeNode(name)
    if root is None:
        return node, True
    # Walk down, remembering the parent links as (owner, side) so that the
    # rebalancing point can be re-linked; owner None means the root.
    path: list[tuple[TreeNode | None, str]] = []
    rebalance_at = 0  # index into path of the last node with a non-zero balance
    owner: TreeNode | None = None
    side = "root"
    p: TreeNode | None = root
    path.append((owner, side))
    while True:
        assert p is not None
        c = _cmp(name, p.name)
        if c == 0:
            return root, False
        owner, side = p, ("right" if c > 0 else "left")
        nxt = getattr(p, side)
        if nxt is None:
            break
        path.append((owner, side))
        if nxt.balance != 0:
            rebalance_at = len(path) - 1
        p = nxt
    setattr(owner, side, node)

    def child(link: tuple[TreeNode | None, str]) -> TreeNode:
        parent, which = link
        found = root if parent is None else getattr(parent, which)
        assert found is not None
        return found

    s = child(path[rebalance_at])
    r = s.right if _cmp(name, s.name) > 0 else s.left
    assert r is not None
    p = r
    while p is not node:
        assert p is not None
        if _cmp(name, p.name) < 0:
            p.balance = _LEFT
            p = p.left
        else:
            p.balance = _RIGHT
            p = p.right

    a = _LEFT if _cmp(name, s.name) < 0 else _RIGHT
    if s.balance == 0:
        s.balance = a
        return root, True
    if s.balance != a:
        s.balance = 0
        return root, True

    if r.balance == a:  # single rotation
        top = r
        if a == _RIGHT:
            s.right, r.left = r.left, s
        else:
            s.left, r.right = r.right, s
        s.balance = r.balance = 0
    else:  # double rotation
        if a == _RIGHT:
            if r.left is None:  # corrupt tree: Exim leaves it unbalanced
                return root, True
            top = r.left
            r.left, top.right = top.right, r
            s.right, top.left = top.left, s
        else:
            if r.right is None:
                return root, True
            top = r.right
            r.right, top.left = top.left, r
            s.left, top.right = top.right, s
        flip = a ^ (_LEFT | _RIGHT)
        s.balance = flip if top.balance == a else 0
        r.balance = a if top.balance == flip else 0
        top.balance = 0

    parent, which = path[rebalance_at]
    if parent is None:
        return top, True
    setattr(parent, which, top)
    return root, True


def tree_build(names: Iterable[str]) -> TreeNode | None:
    """The tree Exim builds by inserting *names* in order."""
    root: TreeNode | None = None
    for name in names:
        root, _ = tree_insert(root, name)
    return root


def preorder(root: TreeNode | None) -> Iterator[TreeNode]:
    """The nodes in the order Exim walks and writes them."""
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        yield node
        if node.right is not None:
            stack.append(node.right)
        if node.left is not None:
            stack.append(node.left)


def tree_names(root: TreeNode | None) -> list[str]:
    """The names in the tree, in pre-order."""
    return [node.name for node in preorder(root)]


def tree_contains(root: TreeNode | None, name: str) -> bool:
    """True when *name* is in the tree."""
    while root is not None:
        c = _cmp(name, root.name)
        if c == 0:
            return True
        root = root.left if c < 0 else root.right
    return False


def fix_balances(root: TreeNode | None) -> int:
    """Recompute balance factors from subtree depths (as Exim does after
    reading a tree from the spool); return the depth of *root*."""
    if root is None:
        return 0
    left = fix_balances(root.left)
    right = fix_balances(root.right)
    root.balance = _LEFT if left > right else _RIGHT if right > left else 0
    return 1 + max(left, right)


def spool_order(names: Iterable[str]) -> list[str]:
    """The order in which Exim writes *names*, given in insertion order;
    repeated names keep their first position, as re-setting an ACL variable
    does not move it in the tree."""
    return tree_names(tree_build(names))
