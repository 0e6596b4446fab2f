"""How every writer of the package puts its output on disk, and what it says when the disk is full.

``staging``: write-then-rename (an output appears complete or not at all), the removal of what killed
writers left behind, and the refusal of two outputs that are one path.
``disk_full``: a full disk or an exhausted quota recognised in any error, told as one line naming where.
"""
