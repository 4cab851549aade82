from privimage.cli import main

main()
