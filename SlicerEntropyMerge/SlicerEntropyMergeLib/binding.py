"""The panel connected to its parameter node once per node, on every Slicer release.

Slicer 5.8's ``parameterNodeWrapper.connectGui`` returns no tag (fixed in 5.10), so ``disconnectGui``
cannot undo a connection there; connecting again on each ``enter()`` stacks connections, and the
stale ones reset the combo boxes to their first entry. So the panel stays connected to the node it
shows and is connected anew only when the node itself changes (a new scene).
"""

from __future__ import annotations


def mrml_node(wrapper):
    """The MRML node behind a ``parameterNodeWrapper`` object (each ``getParameterNode()`` makes a new wrapper)."""
    return getattr(wrapper, "parameterNode", wrapper)


class GuiBinding:
    """Keeps ``gui`` connected to one parameter node at a time."""

    def __init__(self, gui):
        self.gui = gui
        self.node = None
        self.tag = None

    def bind(self, node):
        """Connect ``gui`` to ``node`` unless it already is (the same MRML node); returns the wrapper in use."""
        if node is not None and self.node is not None and mrml_node(node) is mrml_node(self.node):
            return self.node
        self.unbind()
        self.node = node
        if node is not None:
            self.tag = node.connectGui(self.gui)
        return node

    def unbind(self) -> None:
        """Disconnect from the current node (where the release gave a tag to do it with) and forget it."""
        if self.node is not None and self.tag is not None:
            self.node.disconnectGui(self.tag)
        self.node, self.tag = None, None
