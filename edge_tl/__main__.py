from edge_tl.cli import main

main()
