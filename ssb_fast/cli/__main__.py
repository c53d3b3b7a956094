from ssb_fast.cli import main

main()
