"""The feed's own server: its ZMTP codec (``codec``, no sockets), the server that drives
it (``server``), and the C senders the capture threads write with (``_peers.c``,
``_feed.c``)."""
