from flgc_lightning.report import main

main()
